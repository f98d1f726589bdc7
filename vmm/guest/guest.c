/*
 * runv test guest: boot-info parsing, serial output and the test selector.
 *
 * The command line chooses what to do: `test=NAME` with NAME one of
 *   (none)        print, run the device steps the command line asks for, power off
 *   hello         print one line and power off (the cold-start benchmark)
 *   triple-fault  load an empty IDT and trap
 *   reset         i8042 reset (0xfe to port 0x64)
 *   panic         pvpanic (port 0x505)
 *   loop          print "tick N" forever (for pause/resume/kill tests)
 *   idle          route the ACPI GED's interrupt, print one line, then sleep
 *                 in `hlt` until the GED reports the host's power button
 *                 (many VMs on few cores: capacity benchmarks)
 *   bad-virtio    post garbage descriptors to the first virtio-mmio device
 *   container     stand in for runv-init: speak the guest side of the node
 *                 agent's channel (runv_vmm_api::guest) on virtio-vsock port
 *                 1024 and report a container that exits with `exit=N` (or
 *                 dies of `signal=S`), writes a stdout and a stderr line
 *                 with `out=WORD`, or with `run=forever` runs until the
 *                 host's Stop (then signal 15); details in container.c
 */
#include "guest.h"

#define COM1 0x3f8
#define ACPI_SLEEP_CTL 0x600
#define PVH_MAGIC 0x336ec578u

static const char *cmdline = "";

void *memset(void *d, int c, u64 n) { u8 *p = d; while (n--) *p++ = (u8)c; return d; }
/* One string instruction: on kvm_pvm, where the guest's instructions are
 * emulated one by one, a byte loop costs an emulated instruction per step.
 * Copies forward, so a move to a lower address may overlap. */
void *memcpy(void *d, const void *s, u64 n)
{
	void *r = d;
	__asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
	return r;
}

/* 16550 FIFO: once the transmitter is empty, 16 bytes may be written. */
static int fifo_room;

void putc(char c)
{
	if (!fifo_room) {
		while (!(inb(COM1 + 5) & 0x20))
			;
		fifo_room = 16;
	}
	fifo_room--;
	outb(COM1, (u8)c);
}

void puts(const char *s) { while (*s) putc(*s++); }

void puthex(u64 v)
{
	char buf[19];
	int i = 18;
	buf[i] = 0;
	do { buf[--i] = "0123456789abcdef"[v & 15]; v >>= 4; } while (v);
	buf[--i] = 'x';
	buf[--i] = '0';
	puts(&buf[i]);
}

void putdec(u64 v)
{
	char buf[21];
	int i = 20;
	buf[i] = 0;
	do { buf[--i] = (char)('0' + v % 10); v /= 10; } while (v);
	puts(&buf[i]);
}

void poweroff(void)
{
	int len;
	const char *how = cmdline_get("poweroff", &len);
	puts("runv-guest: poweroff\n");
	/* QEMU comparison runs: isa-debug-exit at 0xf4 ends QEMU. */
	if (how && str_eq(how, len, "debug-exit"))
		outb(0xf4, 0);
	outb(ACPI_SLEEP_CTL, 0x34); /* SLP_TYP=5 (S5) | SLP_EN */
	for (;;)
		__asm__ volatile("cli; hlt");
}

/* Port 0x601 bit 0: the host asked for a graceful shutdown. */
int power_button(void) { return inb(ACPI_SLEEP_CTL + 1) & 1; }

/* A failed step ends the VM non-zero: pvpanic (exit 13 under runv-vmm). */
void fail(const char *what)
{
	puts("runv-guest: FAIL ");
	puts(what);
	puts("\n");
	outb(0x505, 1);
	poweroff();
}

int str_eq(const char *a, int alen, const char *b)
{
	int i = 0;
	for (; i < alen; i++)
		if (b[i] != a[i])
			return 0;
	return b[i] == 0;
}

/* Value of `key=` on the command line (not NUL-terminated; *len set). */
const char *cmdline_get(const char *key, int *len)
{
	const char *p = cmdline;
	while (*p) {
		while (*p == ' ')
			p++;
		const char *k = key, *q = p;
		while (*k && *q == *k) { k++; q++; }
		if (!*k && *q == '=') {
			q++;
			const char *e = q;
			while (*e && *e != ' ')
				e++;
			*len = (int)(e - q);
			return q;
		}
		while (*p && *p != ' ')
			p++;
	}
	return 0;
}

static void triple_fault(void)
{
	struct __attribute__((packed)) { u16 limit; u64 base; } idt = { 0, 0 };
	puts("runv-guest: triple-fault\n");
	__asm__ volatile("lidt %0; int3" : : "m"(idt));
}

/*
 * Busy wait on a register. On kvm_pvm, guest kernel-mode code is emulated in
 * batches (~0.5 us per instruction) and `pause` traps, so keep loops short.
 */
static void spin(u64 n) { for (u64 i = 0; i < n; i++) __asm__ volatile("" : "+r"(i)); }

static u64 mem_from_e820(int kind, u64 info)
{
	u64 total = 0;
	if (kind == 1) {
		u64 map = *(u64 *)(info + 40);
		u32 n = *(u32 *)(info + 48);
		for (u32 i = 0; i < n && i < 128; i++) {
			u64 e = map + i * 24;
			if (*(u32 *)(e + 16) == 1)
				total += *(u64 *)(e + 8);
		}
	} else {
		u8 n = *(u8 *)(info + 0x1e8);
		for (u32 i = 0; i < n && i < 128; i++) {
			u64 e = info + 0x2d0 + i * 20;
			if (*(u32 *)(e + 16) == 1)
				total += *(u64 *)(e + 8);
		}
	}
	return total;
}

/* The RSDP the boot information points to, or 0. */
static u64 acpi_rsdp(int kind, u64 info)
{
	u64 rsdp = kind == 1 ? *(u64 *)(info + 32) : *(u64 *)(info + 0x70);
	return rsdp && str_eq((const char *)rsdp, 8, "RSD PTR ") ? rsdp : 0;
}

/* The DSDT (through XSDT → FADT), or 0. */
static u64 acpi_dsdt(u64 rsdp)
{
	if (!rsdp)
		return 0;
	u64 xsdt = *(u64 *)(rsdp + 24);
	u32 n = (*(u32 *)(xsdt + 4) - 36) / 8;
	for (u32 i = 0; i < n && i < 16; i++) {
		u64 t = *(u64 *)(xsdt + 36 + 8 * i);
		if (str_eq((const char *)t, 4, "FACP"))
			return *(u64 *)(t + 140);
	}
	return 0;
}

/*
 * The GSI of the ACPI Generic Event Device: the first Extended Interrupt
 * descriptor (0x89, length 6, one interrupt) after its _HID "ACPI0013" in
 * the DSDT. -1 when there is none.
 */
static int acpi_ged_gsi(u64 dsdt)
{
	if (!dsdt)
		return -1;
	u64 end = dsdt + *(u32 *)(dsdt + 4);
	u64 p = dsdt;
	while (p + 8 <= end && !str_eq((const char *)p, 8, "ACPI0013"))
		p++;
	for (; p + 9 <= end; p++) {
		u8 *d = (u8 *)p;
		if (d[0] == 0x89 && d[1] == 6 && d[2] == 0 && d[4] == 1)
			return *(u32 *)(p + 5) < 24 ? (int)*(u32 *)(p + 5) : -1;
	}
	return -1;
}

/* Walks RSDP → XSDT → FADT/DSDT and MADT, counting LAPICs and virtio devices
 * and finding the GED's interrupt. */
static void acpi_check(int kind, u64 info)
{
	u64 rsdp = acpi_rsdp(kind, info);
	if (!rsdp) {
		puts("runv-guest: acpi none\n");
		return;
	}
	u64 xsdt = *(u64 *)(rsdp + 24);
	u32 n = (*(u32 *)(xsdt + 4) - 36) / 8;
	u32 lapics = 0, virtio = 0;
	for (u32 i = 0; i < n && i < 16; i++) {
		u64 t = *(u64 *)(xsdt + 36 + 8 * i);
		u32 len = *(u32 *)(t + 4);
		if (str_eq((const char *)t, 4, "APIC")) {
			for (u64 p = t + 44; p + 2 <= t + len && *(u8 *)(p + 1); p += *(u8 *)(p + 1))
				if (*(u8 *)p == 0)
					lapics++;
		} else if (str_eq((const char *)t, 4, "FACP")) {
			u64 dsdt = *(u64 *)(t + 140);
			u32 dlen = *(u32 *)(dsdt + 4);
			for (u64 p = dsdt; p + 8 <= dsdt + dlen; p++)
				if (str_eq((const char *)p, 8, "LNRO0005"))
					virtio++;
		}
	}
	puts("runv-guest: acpi lapics=");
	putdec(lapics);
	puts(" virtio=");
	putdec(virtio);
	int gsi = acpi_ged_gsi(acpi_dsdt(rsdp));
	puts(" ged_gsi=");
	if (gsi < 0)
		puts("none");
	else
		putdec((u64)gsi);
	puts("\n");
}

void guest_main(int kind, u64 info)
{
	if (kind == 1) {
		if (*(u32 *)info != PVH_MAGIC)
			fail("bad hvm_start_info magic");
		cmdline = (const char *)*(u64 *)(info + 24);
	} else {
		cmdline = (const char *)(u64)*(u32 *)(info + 0x228);
	}
	if (!cmdline)
		cmdline = "";
	puts("runv-guest: hello\n");
	int hlen;
	const char *quick = cmdline_get("test", &hlen);
	if (quick && str_eq(quick, hlen, "hello"))
		poweroff(); /* the cold-start benchmark: one line, then off */
	puts(kind == 1 ? "runv-guest: entry=pvh\n" : "runv-guest: entry=linux64\n");
	puts("runv-guest: cmdline=");
	puts(cmdline);
	puts("\n");
	puts("runv-guest: mem_mib=");
	putdec((mem_from_e820(kind, info) + (1 << 19)) >> 20);
	puts("\n");

	int len = 0;
	const char *t = cmdline_get("test", &len);
	if (!t || str_eq(t, len, "devices")) {
		acpi_check(kind, info);
		smp_start();
		virtio_tests(cmdline);
		poweroff();
	}
	if (str_eq(t, len, "triple-fault"))
		triple_fault();
	if (str_eq(t, len, "reset")) {
		puts("runv-guest: reset\n");
		outb(0x64, 0xfe);
	}
	if (str_eq(t, len, "panic")) {
		puts("runv-guest: panic\n");
		outb(0x505, 1);
	}
	if (str_eq(t, len, "cpuid")) {
		u32 a, b, c, d;
		cpuid(1, &a, &b, &c, &d);
		puts("runv-guest: cpuid1 ecx=");
		puthex(c);
		puts(" edx=");
		puthex(d);
		cpuid(7, &a, &b, &c, &d);
		puts(" cpuid7 ebx=");
		puthex(b);
		puts("\n");
		poweroff();
	}
	if (str_eq(t, len, "loop")) {
		for (u64 n = 0;; n++) {
			puts("tick ");
			putdec(n);
			puts("\n");
			spin(20000);
			if (power_button()) {
				puts("runv-guest: power button\n");
				poweroff();
			}
		}
	}
	if (str_eq(t, len, "idle")) {
		/* The GSI comes from the DSDT, as a kernel's GED driver finds it. */
		int gsi = acpi_ged_gsi(acpi_dsdt(acpi_rsdp(kind, info)));
		if (gsi < 0)
			fail("no ACPI GED interrupt in the DSDT");
		irq_setup();
		irq_route_ged((u32)gsi);
		/* The last output before sleeping: nothing exits to the VMM after it
		 * until the GED interrupt (or a watchdog wake-up, counted below). */
		puts("runv-guest: idle ged_gsi=");
		putdec((u64)gsi);
		puts("\n");
		u32 wakes = 0;
		int via_ged = irq_sleep_ged(1, power_button, &wakes);
		puts("runv-guest: power button via=");
		puts(via_ged ? "ged" : "poll");
		puts(" watchdog=");
		putdec(wakes);
		puts("\n");
		poweroff();
	}
	if (str_eq(t, len, "bad-virtio"))
		virtio_garbage(cmdline);
	if (str_eq(t, len, "container"))
		container_main(cmdline);
	fail("unknown test or test returned");
}

/* --- SMP: start the other vCPUs with INIT-SIPI-SIPI through the local APIC --- */

#define LAPIC 0xfee00000ul
#define AP_TRAMPOLINE 0x10000ul
extern char ap_trampoline[], ap_trampoline_end[], ap_tramp_cr3[];
static volatile u32 aps_online;

void ap_main(void)
{
	__atomic_fetch_add(&aps_online, 1, __ATOMIC_SEQ_CST);
	for (;;)
		__asm__ volatile("cli; hlt");
}

void cpuid(u32 leaf, u32 *a, u32 *b, u32 *c, u32 *d)
{
	__asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

static void ipi(u32 apic_id, u32 low)
{
	mmio_write32(LAPIC + 0x310, apic_id << 24);
	mmio_write32(LAPIC + 0x300, low);
	for (int i = 0; i < 1000 && (mmio_read32(LAPIC + 0x300) & (1u << 12)); i++)
		;
}

void smp_start(void)
{
	u32 a, b, c, d;
	cpuid(1, &a, &b, &c, &d);
	u32 cpus = (d & (1u << 28)) ? (b >> 16) & 0xff : 1;
	if (cpus > 9)
		cpus = 9;
	if (cpus < 2)
		return;
	u64 cr3;
	__asm__ volatile("mov %%cr3, %0" : "=r"(cr3));
	u64 len = (u64)(ap_trampoline_end - ap_trampoline);
	memcpy((void *)AP_TRAMPOLINE, ap_trampoline, len);
	*(u32 *)(AP_TRAMPOLINE + (u64)(ap_tramp_cr3 - ap_trampoline)) = (u32)cr3;
	barrier();
	/* Software-enable the local APIC (spurious vector register). */
	mmio_write32(LAPIC + 0xf0, mmio_read32(LAPIC + 0xf0) | 0x1ff);
	for (u32 id = 1; id < cpus; id++) {
		ipi(id, 0x4500); /* INIT, level assert */
		ipi(id, 0x4600 | (u32)(AP_TRAMPOLINE >> 12)); /* STARTUP */
		ipi(id, 0x4600 | (u32)(AP_TRAMPOLINE >> 12));
	}
	for (u64 i = 0; i < 200000 && aps_online < cpus - 1; i++)
		barrier();
	puts("runv-guest: cpus=");
	putdec(cpus);
	puts(" online=");
	putdec(aps_online + 1);
	puts("\n");
}
