//! x86_64 guest setup: the physical memory map, boot structures (zero page, PVH start info, MP
//! table) and the initial vCPU state (CPUID, MSRs, registers).

pub mod boot_params;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod msrs;
pub mod regs;
