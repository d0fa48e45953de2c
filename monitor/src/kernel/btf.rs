//! Reads struct member offsets from kernel BTF (/sys/kernel/btf/vmlinux) for the eBPF programs.
//!
//! rustc emits no CO-RE relocations, so the agent resolves the few fields its programs read and
//! passes them as a read-only global. A field that cannot be resolved makes eBPF mode unavailable
//! (the agent then runs in poll mode and says why).
use std::collections::HashMap;

use monitor_common::KernelOffsets;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read {path}: {source} (the kernel needs CONFIG_DEBUG_INFO_BTF=y)")]
    Read { path: String, source: std::io::Error },
    #[error("malformed BTF: {0}")]
    Malformed(&'static str),
    #[error("kernel BTF has no struct `{0}`")]
    NoStruct(String),
    #[error("kernel BTF: struct `{strukt}` has no member `{member}`")]
    NoMember { strukt: String, member: String },
    #[error("kernel BTF: `{0}` is a bitfield; holdfast reads only whole fields")]
    Bitfield(String),
}

const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

#[derive(Clone, Debug)]
struct Member {
    name: u32,
    ty: u32,
    /// Bit offset; `bitfield` says whether it is a bitfield member.
    bit_off: u32,
    bitfield: bool,
}

#[derive(Clone, Debug)]
enum Ty {
    Composite { name: u32, members: Vec<Member> },
    Modifier { target: u32 },
    Other,
}

/// The parts of a BTF blob holdfast needs: composite types and the string table.
pub struct Btf {
    types: Vec<Ty>, // index = type id; id 0 is void
    strings: Vec<u8>,
    by_name: HashMap<String, u32>,
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, BtfError> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(BtfError::Malformed("truncated"))
}

impl Btf {
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        let path = "/sys/kernel/btf/vmlinux";
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(&data)
    }

    /// Parses a little-endian BTF blob.
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        if data.len() < 24 || data[0..2] != [0x9f, 0xeb] {
            return Err(BtfError::Malformed("bad magic (expected little-endian BTF)"));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let type_off = u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let types_b = data
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or(BtfError::Malformed("type section out of bounds"))?;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(BtfError::Malformed("string section out of bounds"))?
            .to_vec();
        let mut types = vec![Ty::Other];
        let mut p = 0usize;
        while p < types_b.len() {
            let name = u32_at(types_b, p)?;
            let info = u32_at(types_b, p + 4)?;
            let size_or_type = u32_at(types_b, p + 8)?;
            p += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kflag = info >> 31 == 1;
            let ty = match kind {
                KIND_STRUCT | KIND_UNION => {
                    let mut members = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        let m = p + i * 12;
                        let off = u32_at(types_b, m + 8)?;
                        let (bit_off, bitfield) = if kflag {
                            (off & 0x00ff_ffff, off >> 24 != 0)
                        } else {
                            (off, false)
                        };
                        members.push(Member {
                            name: u32_at(types_b, m)?,
                            ty: u32_at(types_b, m + 4)?,
                            bit_off,
                            bitfield,
                        });
                    }
                    Ty::Composite { name, members }
                }
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    Ty::Modifier { target: size_or_type }
                }
                _ => Ty::Other,
            };
            p += match kind {
                1 => 4,             // INT
                3 => 12,            // ARRAY
                4 | 5 => vlen * 12, // STRUCT, UNION
                6 => vlen * 8,      // ENUM
                13 => vlen * 8,     // FUNC_PROTO
                14 => 4,            // VAR
                15 => vlen * 12,    // DATASEC
                17 => 4,            // DECL_TAG
                19 => vlen * 12,    // ENUM64
                2 | 7 | 8 | 9 | 10 | 11 | 12 | 16 | 18 => 0,
                _ => return Err(BtfError::Malformed("unknown BTF kind")),
            };
            types.push(ty);
        }
        let mut btf = Btf {
            types,
            strings,
            by_name: HashMap::new(),
        };
        for (id, t) in btf.types.iter().enumerate() {
            if let Ty::Composite { name, .. } = t
                && *name != 0
            {
                let n = btf.str(*name).to_string();
                btf.by_name.entry(n).or_insert(id as u32);
            }
        }
        Ok(btf)
    }

    fn str(&self, off: u32) -> &str {
        let s = self.strings.get(off as usize..).unwrap_or(&[]);
        let end = s.iter().position(|&c| c == 0).unwrap_or(s.len());
        std::str::from_utf8(&s[..end]).unwrap_or("")
    }

    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.types.get(id as usize) {
                Some(Ty::Modifier { target }) => id = *target,
                _ => break,
            }
        }
        id
    }

    /// Finds `member` in composite `id`, looking through anonymous struct/union members.
    /// Returns (byte offset, member type id).
    fn find(&self, id: u32, member: &str, depth: u32) -> Option<(u32, u32)> {
        let Some(Ty::Composite { members, .. }) = self.types.get(self.resolve(id) as usize) else {
            return None;
        };
        for m in members {
            if self.str(m.name) == member {
                if m.bitfield || m.bit_off % 8 != 0 {
                    return Some((u32::MAX, m.ty));
                }
                return Some((m.bit_off / 8, m.ty));
            }
        }
        if depth > 8 {
            return None;
        }
        for m in members.iter().filter(|m| m.name == 0) {
            if let Some((off, ty)) = self.find(m.ty, member, depth + 1) {
                if off == u32::MAX {
                    return Some((off, ty));
                }
                return Some((m.bit_off / 8 + off, ty));
            }
        }
        None
    }

    /// Byte offset of a dotted member path (`"icsk_ack.lrcvtime"`) inside struct `strukt`.
    pub fn offset(&self, strukt: &str, path: &str) -> Result<u32, BtfError> {
        let mut id = *self
            .by_name
            .get(strukt)
            .ok_or_else(|| BtfError::NoStruct(strukt.into()))?;
        let mut total = 0u32;
        for part in path.split('.') {
            let (off, ty) = self.find(id, part, 0).ok_or_else(|| BtfError::NoMember {
                strukt: strukt.into(),
                member: path.into(),
            })?;
            if off == u32::MAX {
                return Err(BtfError::Bitfield(format!("{strukt}.{path}")));
            }
            total += off;
            id = ty;
        }
        Ok(total)
    }
}

/// Resolves every offset the eBPF programs need.
pub fn kernel_offsets(btf: &Btf) -> Result<KernelOffsets, BtfError> {
    // The programs treat `struct sock *` as the base of every read. These nestings make the
    // offsets of inet_connection_sock and tcp_sock fields valid from that base; check them.
    for (outer, first) in [
        ("sock", "__sk_common"),
        ("inet_sock", "sk"),
        ("inet_connection_sock", "icsk_inet"),
        ("tcp_sock", "inet_conn"),
    ] {
        if btf.offset(outer, first)? != 0 {
            return Err(BtfError::NoMember {
                strukt: outer.into(),
                member: format!("{first} at offset 0"),
            });
        }
    }
    let sc = |m: &str| btf.offset("sock_common", m);
    let sk = |m: &str| btf.offset("sock", m);
    let ic = |m: &str| btf.offset("inet_connection_sock", m);
    let tp = |m: &str| btf.offset("tcp_sock", m);
    let timer_expires = btf.offset("timer_list", "expires")?;
    let timer_pprev = btf.offset("timer_list", "entry.pprev")?;
    Ok(KernelOffsets {
        skc_daddr: sc("skc_daddr")?,
        skc_rcv_saddr: sc("skc_rcv_saddr")?,
        skc_dport: sc("skc_dport")?,
        skc_num: sc("skc_num")?,
        skc_family: sc("skc_family")?,
        skc_state: sc("skc_state")?,
        skc_net: sc("skc_net")?,
        skc_v6_daddr: sc("skc_v6_daddr")?,
        skc_v6_rcv_saddr: sc("skc_v6_rcv_saddr")?,
        skc_flags: sc("skc_flags")?,
        net_ns_inum: btf.offset("net", "ns.inum")?,
        sk_socket: sk("sk_socket")?,
        sk_err: sk("sk_err")?,
        sk_protocol: sk("sk_protocol")?,
        sk_timer_expires: sk("sk_timer")? + timer_expires,
        sk_timer_pprev: sk("sk_timer")? + timer_pprev,
        icsk_retransmits: ic("icsk_retransmits")?,
        icsk_pending: ic("icsk_pending")?,
        icsk_backoff: ic("icsk_backoff")?,
        icsk_probes_out: ic("icsk_probes_out")?,
        icsk_lrcvtime: ic("icsk_ack.lrcvtime")?,
        icsk_rto_expires: ic("icsk_retransmit_timer")? + timer_expires,
        tp_lsndtime: tp("lsndtime")?,
        tp_rcv_tstamp: tp("rcv_tstamp")?,
        tp_packets_out: tp("packets_out")?,
        tp_retrans_out: tp("retrans_out")?,
        tp_total_retrans: tp("total_retrans")?,
        tp_keepalive_time: tp("keepalive_time")?,
        tp_keepalive_intvl: tp("keepalive_intvl")?,
        tp_keepalive_probes: tp("keepalive_probes")?,
        socket_sk: btf.offset("socket", "sk")?,
        socket_to_ino: btf.offset("socket_alloc", "vfs_inode")? + btf.offset("inode", "i_ino")?
            - btf.offset("socket_alloc", "socket")?,
        task_pid: btf.offset("task_struct", "pid")?,
        task_tgid: btf.offset("task_struct", "tgid")?,
        task_real_parent: btf.offset("task_struct", "real_parent")?,
        task_exit_code: btf.offset("task_struct", "exit_code")?,
        file_f_inode: btf.offset("file", "f_inode")?,
        inode_i_mode: btf.offset("inode", "i_mode")?,
        inode_i_ino: btf.offset("inode", "i_ino")?,
        // Optional: without it the probe watch is unavailable, nothing else.
        tp_cb_flags: tp("bpf_sock_ops_cb_flags").unwrap_or(u32::MAX),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a tiny BTF blob: int, struct inner { u32 a; u32 b; }, struct outer { int x; struct
    /// inner in; union { u32 anon_field; }; bitfield:3 }.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0inner\0a\0b\0outer\0x\0in\0anon_field\0bf\0".to_vec();
        let s = |name: &str| -> u32 {
            let pos = strings
                .windows(name.len() + 2)
                .position(|w| w[0] == 0 && &w[1..=name.len()] == name.as_bytes() && w[name.len() + 1] == 0)
                .unwrap();
            pos as u32 + 1
        };
        let mut t = Vec::new();
        let mut push = |v: &[u32]| v.iter().for_each(|x| t.extend_from_slice(&x.to_le_bytes()));
        // 1: int (kind 1) + 4 bytes
        push(&[s("int"), 1 << 24, 4, 32]);
        // 2: struct inner, 2 members
        push(&[s("inner"), 4 << 24 | 2, 8, s("a"), 1, 0, s("b"), 1, 32]);
        // 3: anonymous union, 1 member
        push(&[0, 5 << 24 | 1, 4, s("anon_field"), 1, 0]);
        // 4: struct outer (kind_flag set: bitfield encoding), 4 members
        push(&[
            s("outer"),
            1 << 31 | 4 << 24 | 4,
            24,
            s("x"),
            1,
            0,
            s("in"),
            2,
            32,
            0,
            3,
            96,
            s("bf"),
            1,
            3 << 24 | 128,
        ]);
        let mut out = Vec::new();
        out.extend_from_slice(&[0x9f, 0xeb, 1, 0]);
        for v in [24u32, 0, t.len() as u32, t.len() as u32, strings.len() as u32] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&t);
        out.extend_from_slice(&strings);
        out
    }

    #[test]
    fn resolves_nested_anonymous_and_refuses_bitfields() {
        let btf = Btf::parse(&blob()).unwrap();
        assert_eq!(btf.offset("outer", "x").unwrap(), 0);
        assert_eq!(btf.offset("outer", "in.b").unwrap(), 8);
        assert_eq!(btf.offset("outer", "anon_field").unwrap(), 12);
        assert!(matches!(btf.offset("outer", "bf"), Err(BtfError::Bitfield(_))));
        assert!(matches!(
            btf.offset("outer", "nope"),
            Err(BtfError::NoMember { .. })
        ));
        assert!(matches!(btf.offset("missing", "x"), Err(BtfError::NoStruct(_))));
    }

    #[test]
    fn rejects_truncated_and_foreign_blobs() {
        let b = blob();
        assert!(Btf::parse(&b[..30]).is_err());
        assert!(Btf::parse(&[0u8; 40]).is_err());
    }

    #[test]
    fn resolves_this_kernel_when_btf_is_present() {
        let Ok(btf) = Btf::from_sys_fs() else {
            crate::testing::skip(
                "kernel::btf::resolves_this_kernel_when_btf_is_present",
                "/sys/kernel/btf/vmlinux is not readable on this kernel",
            );
            return;
        };
        let o = kernel_offsets(&btf).expect("this kernel's layout resolves");
        assert!(o.skc_v6_daddr > o.skc_family);
        assert!(o.tp_keepalive_time > o.icsk_pending);
    }
}
