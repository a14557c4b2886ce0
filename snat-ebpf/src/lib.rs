//! Empty library target: `snat-user`'s build script depends on this package so that cargo
//! rebuilds the eBPF object when it changes. The programs are in the `snat` binary target.
#![no_std]
