/*
 * runv test guest: entry points.
 *
 * pvh_start:  32-bit protected mode, paging off, %ebx = hvm_start_info
 *             (reached through the Xen PVH ELF note, emitted when PVH_NOTE is set).
 * _start:     64-bit long mode with identity paging set up by the VMM,
 *             %rsi = Linux boot_params (the ELF entry point).
 * ap_start64: 64-bit entry for application processors (from ap_trampoline).
 * Both boot paths end in guest_main(kind, info) with kind 1 = PVH, 2 = Linux.
 */
	.set	MSR_EFER, 0xc0000080

#ifdef PVH_NOTE
	.section .note.pvh, "a", @note
	.p2align 2
	.long	4		/* name size */
	.long	4		/* desc size */
	.long	18		/* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz	"Xen"
	.long	pvh_start
#endif

	.section .text.entry, "ax"
	.code32
	.globl	pvh_start
pvh_start:
	cli
	movl	%ebx, %edi		/* keep start_info across the mode switch */
	/*
	 * Identity-map 0..16 MiB (image, stack, buffers) and the device
	 * windows the guest uses (virtio-mmio at 0xd0000000, or 0xfeb00000 under
	 * QEMU microvm, the IOAPIC at 0xfec00000 and the LAPIC at 0xfee00000) with
	 * 2 MiB pages. Keep this short: kvm_pvm emulates every instruction here.
	 */
	movl	$pdpt + 3, pml4
	movl	$pd + 3, pdpt
	movl	$pd_hi + 3, pdpt + 3 * 8
	movl	$pd, %eax
	movl	$0x83, %edx		/* present, writable, 2 MiB */
	movl	$8, %ecx
1:	movl	%edx, (%eax)
	addl	$0x200000, %edx
	addl	$8, %eax
	loop	1b
	movl	$0xd0000083, pd_hi + 128 * 8
	movl	$0xfea00083, pd_hi + 501 * 8	/* QEMU microvm's virtio-mmio window */
	movl	$0xfec00083, pd_hi + 502 * 8	/* IOAPIC */
	movl	$0xfee00083, pd_hi + 503 * 8
	movl	%cr4, %eax
	orl	$0x20, %eax		/* PAE */
	movl	%eax, %cr4
	movl	$pml4, %eax
	movl	%eax, %cr3
	movl	$MSR_EFER, %ecx
	rdmsr
	orl	$0x100, %eax		/* LME */
	wrmsr
	lgdt	gdt_desc
	movl	%cr0, %eax
	orl	$0x80000001, %eax	/* PG | PE */
	movl	%eax, %cr0
	ljmp	$0x08, $pvh_long

	.code64
pvh_long:
	movw	$0x10, %ax
	movw	%ax, %ds
	movw	%ax, %es
	movw	%ax, %ss
	movl	%edi, %esi
	movl	$1, %edi
	jmp	common64

	.globl	_start
_start:
	cli
	movl	$2, %edi		/* %rsi already holds boot_params */
common64:
	leaq	stack_top(%rip), %rsp
	xorl	%ebp, %ebp
	call	guest_main
2:	cli
	hlt
	jmp	2b

	.globl	ap_start64
ap_start64:
	cli
	movl	$1, %eax
	lock xaddl %eax, ap_next(%rip)	/* this AP's stack slot: 1, 2, ... */
	incl	%eax
	shll	$12, %eax
	leaq	ap_stacks(%rip), %rsp
	addq	%rax, %rsp
	call	ap_main
3:	cli
	hlt
	jmp	3b

/*
 * Interrupt stubs: save the caller-saved registers (nine pushes keep the
 * stack 16-byte aligned at the call), run the C handler, return.
 */
	.macro	IRQ_STUB name, handler
	.globl	\name
\name:
	pushq	%rax
	pushq	%rcx
	pushq	%rdx
	pushq	%rsi
	pushq	%rdi
	pushq	%r8
	pushq	%r9
	pushq	%r10
	pushq	%r11
	call	\handler
	popq	%r11
	popq	%r10
	popq	%r9
	popq	%r8
	popq	%rdi
	popq	%rsi
	popq	%rdx
	popq	%rcx
	popq	%rax
	iretq
	.endm
	IRQ_STUB irq_stub_dev, irq_dev
	IRQ_STUB irq_stub_timer, irq_timer
	IRQ_STUB irq_stub_ged, irq_ged

	.section .rodata
	.p2align 3
gdt:
	.quad	0
	.quad	0x00af9b000000ffff	/* 0x08: 64-bit code */
	.quad	0x00cf93000000ffff	/* 0x10: data */
gdt_end:
gdt_desc:
	.word	gdt_end - gdt - 1
	.long	gdt

	.section .bss
	.p2align 12
pml4:	.skip	4096
pdpt:	.skip	4096
pd:	.skip	4096
pd_hi:	.skip	4096
	.p2align 4
	.skip	16384
stack_top:
ap_stacks:
	.skip	4096 * 8		/* up to 8 APs, 4 KiB each */
ap_next:
	.long	0

/*
 * Application-processor trampoline: copied by the BSP to AP_TRAMPOLINE (a
 * page-aligned address below 1 MiB) and started there by INIT-SIPI-SIPI in
 * real mode with CS = AP_TRAMPOLINE >> 4, IP = 0. It switches straight to long
 * mode using the BSP's page tables (ap_cr3, patched in by the BSP) and jumps
 * to ap_start64. Everything is addressed relative to the copy.
 */
	.section .rodata
	.code16
	.globl	ap_trampoline, ap_trampoline_end, ap_tramp_cr3, ap_tramp_gdt_desc
	.p2align 4
ap_trampoline:
	cli
	movw	%cs, %ax
	movw	%ax, %ds
	lgdtl	ap_tramp_gdt_desc - ap_trampoline
	movl	%cr4, %eax
	orl	$0x20, %eax		/* PAE */
	movl	%eax, %cr4
	movl	ap_tramp_cr3 - ap_trampoline, %eax
	movl	%eax, %cr3
	movl	$MSR_EFER, %ecx
	rdmsr
	orl	$0x100, %eax		/* LME */
	wrmsr
	movl	%cr0, %eax
	orl	$0x80000001, %eax	/* PG | PE */
	movl	%eax, %cr0
	ljmpl	$0x08, $ap_start64
	.p2align 3
ap_tramp_cr3:
	.long	0
ap_tramp_gdt_desc:
	.word	gdt_end - gdt - 1
	.long	gdt
ap_trampoline_end:
	.code64
