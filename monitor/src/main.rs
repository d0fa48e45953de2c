fn main() {
    let (mut l, mut ev) = holdfast::ebpf::load().expect("load");
    let s = l.snapshot().expect("snap");
    println!("hz={} socks={}", l.hz(), s.socks.len());
    for x in &s.socks { println!("{x:?}"); }
    std::thread::sleep(std::time::Duration::from_secs(2));
    let mut v = Vec::new();
    ev.drain(&mut v);
    for e in &v { println!("{e:?}"); }
    println!("{:?}", l.counters());
}
