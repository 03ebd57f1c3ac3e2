//! Helpers of the VMM's tests: a console that can be read back, and tiny guest programs,
//! including a synthetic PVH ELF "kernel" of a few instructions.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use nutshell_vmm::{Console, CpuProfileChoice, MachineConfig};

/// A console writer whose bytes the test can read.
#[derive(Clone, Default)]
pub struct Captured(pub Arc<Mutex<Vec<u8>>>);

impl Captured {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Captured {
    fn write(&mut self, d: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(d);
        Ok(d.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A little assembler for the handful of x86 instructions the tiny guests use. The encodings
/// are the same in 32-bit protected mode and 64-bit long mode.
#[derive(Default)]
pub struct Asm(pub Vec<u8>);

impl Asm {
    pub fn mov_dx(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&[0x66, 0xba]);
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn mov_al(&mut self, v: u8) -> &mut Self {
        self.0.extend_from_slice(&[0xb0, v]);
        self
    }
    pub fn out_dx_al(&mut self) -> &mut Self {
        self.0.push(0xee);
        self
    }
    pub fn in_al_dx(&mut self) -> &mut Self {
        self.0.push(0xec);
        self
    }
    /// Writes `s` to COM1.
    pub fn print(&mut self, s: &str) -> &mut Self {
        self.mov_dx(0x3f8);
        for b in s.bytes() {
            self.mov_al(b).out_dx_al();
        }
        self
    }
    /// Writes `v` to I/O port `port`.
    pub fn outb(&mut self, port: u16, v: u8) -> &mut Self {
        self.mov_dx(port).mov_al(v).out_dx_al()
    }
    pub fn hang(&mut self) -> &mut Self {
        self.0.extend_from_slice(&[0xeb, 0xfe]);
        self
    }
    pub fn ud2(&mut self) -> &mut Self {
        self.0.extend_from_slice(&[0x0f, 0x0b]);
        self
    }
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
}

/// Power-off through the exit port.
pub fn poweroff(a: &mut Asm) -> &mut Asm {
    a.outb(0x501, 0).hang()
}

/// A 64-bit ELF executable with one PT_LOAD segment of `code` at physical `load_addr`,
/// `bss` extra bytes of memory, and (optionally) a Xen PVH entry note pointing at it.
pub fn pvh_elf(code: &[u8], load_addr: u64, bss: u64, with_pvh_note: bool) -> Vec<u8> {
    const PHDR_SIZE: usize = 56;
    let phnum: u16 = if with_pvh_note { 2 } else { 1 };
    let note_off = 64 + PHDR_SIZE * usize::from(phnum);
    let note: Vec<u8> = [
        4u32.to_le_bytes(),
        4u32.to_le_bytes(),
        18u32.to_le_bytes(),
        *b"Xen\0",
        (load_addr as u32).to_le_bytes(),
    ]
    .concat();
    let code_off = 0x1000usize;

    let mut f = Vec::new();
    f.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&load_addr.to_le_bytes()); // e_entry
    f.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes());
    f.extend_from_slice(&64u16.to_le_bytes());
    f.extend_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
    f.extend_from_slice(&phnum.to_le_bytes());
    f.extend_from_slice(&[0; 6]);
    let phdr = |f: &mut Vec<u8>, kind: u32, off: u64, paddr: u64, filesz: u64, memsz: u64| {
        f.extend_from_slice(&kind.to_le_bytes());
        f.extend_from_slice(&5u32.to_le_bytes());
        f.extend_from_slice(&off.to_le_bytes());
        f.extend_from_slice(&paddr.to_le_bytes());
        f.extend_from_slice(&paddr.to_le_bytes());
        f.extend_from_slice(&filesz.to_le_bytes());
        f.extend_from_slice(&memsz.to_le_bytes());
        f.extend_from_slice(&4u64.to_le_bytes());
    };
    let len = code.len() as u64;
    phdr(&mut f, 1, code_off as u64, load_addr, len, len + bss);
    if with_pvh_note {
        phdr(
            &mut f,
            4,
            note_off as u64,
            0,
            note.len() as u64,
            note.len() as u64,
        );
        f.extend_from_slice(&note);
    }
    f.resize(code_off, 0);
    f.extend_from_slice(code);
    f
}

/// 32-bit code run at the PVH entry: checks the hvm_start_info magic at %ebx, prints
/// "PVH ok " followed by the command line the VMM wrote, a newline, and powers off; on a bad
/// magic prints "PVH bad magic" and reports a panic.
pub fn pvh_check_program() -> Vec<u8> {
    let mut ok = Asm::default();
    ok.print("PVH ok ");
    // mov esi, [ebx+24] (cmdline_paddr, low half)
    ok.bytes(&[0x8b, 0x73, 0x18]);
    // loop: mov al,[esi]; test al,al; jz done; out dx,al; inc esi; jmp loop
    ok.bytes(&[0x8a, 0x06, 0x84, 0xc0, 0x74, 0x04, 0xee, 0x46, 0xeb, 0xf6]);
    ok.mov_al(b'\n').out_dx_al();
    poweroff(&mut ok);

    let mut bad = Asm::default();
    bad.print("PVH bad magic\n").outb(0x501, 1).hang();

    let mut a = Asm::default();
    // mov eax,[ebx]; cmp eax, XEN_HVM_START_MAGIC; je ok (skip the bad path)
    a.bytes(&[0x8b, 0x03, 0x3d])
        .bytes(&0x336e_c578u32.to_le_bytes());
    a.bytes(&[0x0f, 0x84])
        .bytes(&(bad.len() as u32).to_le_bytes());
    a.bytes(&bad.0).bytes(&ok.0);
    a.0
}

/// Where [`counter_program`] counts.
pub const COUNTER: u64 = 0x20_0000;

/// `loop: inc qword [COUNTER]; rax = [COUNTER]; out 0x3f8, '0' + rax % 10; jmp loop`
pub fn counter_program() -> Asm {
    let addr = (COUNTER as u32).to_le_bytes();
    let mut p = Asm::default();
    p.bytes(&[0x48, 0xff, 0x04, 0x25]).bytes(&addr); // inc qword [addr]
    p.bytes(&[0x48, 0x8b, 0x04, 0x25]).bytes(&addr); // mov rax, [addr]
    p.bytes(&[0xb9, 10, 0, 0, 0]); // mov ecx, 10
    p.bytes(&[0x31, 0xd2]); // xor edx, edx
    p.bytes(&[0x48, 0xf7, 0xf1]); // div rcx
    p.bytes(&[0x88, 0xd0]); // mov al, dl
    p.bytes(&[0x04, b'0']); // add al, '0'
    p.mov_dx(0x3f8).out_dx_al();
    let back = -(i8::try_from(p.len() + 2).unwrap());
    p.bytes(&[0xeb, back as u8]); // jmp loop
    p
}

/// Every digit follows the one before it (mod 10): no output lost or repeated.
pub fn assert_consecutive(text: &str) {
    let digits: Vec<u8> = text.bytes().map(|b| b - b'0').collect();
    for (i, w) in digits.windows(2).enumerate() {
        assert_eq!((w[0] + 1) % 10, w[1], "digits break at {i}");
    }
}

/// Where the tiny guests' code is loaded (and the synthetic kernels' load address).
pub const LOAD_ADDR: u64 = 0x10_0000;

/// A 16 MiB machine with `vcpus` vCPUs whose console the test reads.
pub fn machine(vcpus: u8, console: &Captured) -> MachineConfig {
    MachineConfig {
        memory_mib: 16,
        vcpus,
        console: Console::Writer(Box::new(console.clone())),
        cpu_profile: CpuProfileChoice::Auto,
        started_at: None,
        devices: Vec::new(),
    }
}
