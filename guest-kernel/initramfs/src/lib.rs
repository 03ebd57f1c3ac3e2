//! Writes newc cpio archives (the initramfs format of Linux).
