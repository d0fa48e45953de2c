//! The kernel's views and the system calls holdfast uses: eBPF programs and iterators, BTF,
//! sock_diag, rtnetlink, procfs, cgroups, network namespaces, feature probes. Everything that
//! touches the kernel is below this folder; the layers above see the typed model.
pub mod btf;
pub mod cgroups;
pub mod decode;
pub mod ebpf;
pub mod held;
pub mod netns;
pub mod owners;
pub mod probes;
pub mod procfs;
pub mod routes;
pub mod sockdiag;
pub mod sys;
pub mod tables;
