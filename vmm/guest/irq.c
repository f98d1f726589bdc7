/*
 * runv test guest: interrupts. An IDT with two vectors, the local APIC (xAPIC
 * MMIO: enable, EOI, a one-shot timer as a watchdog) and one IOAPIC
 * redirection entry, so a virtio device's completion can be awaited with
 * `hlt` instead of polling. Every wait ends: the watchdog timer fires after
 * about 4 s of host time if the device interrupt never comes.
 */
#include "guest.h"

#define LAPIC 0xfee00000ul
#define LAPIC_TPR 0x080
#define LAPIC_EOI 0x0b0
#define LAPIC_SVR 0x0f0
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_TIMER_INIT 0x380
#define LAPIC_TIMER_DIV 0x3e0
#define IOAPIC 0xfec00000ul
#define VEC_DEV 0x40
#define VEC_TIMER 0x41

struct gate {
	u16 off0, sel;
	u8 ist, type;
	u16 off1;
	u32 off2, zero;
} __attribute__((packed));

static struct gate idt[256] __attribute__((aligned(16)));
extern char irq_stub_dev[], irq_stub_timer[];

static volatile u32 dev_count, all_count, timer_fired, rte_in_handler;
static u32 late;
static u64 dev_base;
static u32 dev_pin;

static void set_gate(int v, char *fn, u16 cs)
{
	u64 a = (u64)fn;
	idt[v].off0 = (u16)a;
	idt[v].sel = cs;
	idt[v].ist = 0;
	idt[v].type = 0x8e; /* present, DPL 0, 64-bit interrupt gate */
	idt[v].off1 = (u16)(a >> 16);
	idt[v].off2 = (u32)(a >> 32);
	idt[v].zero = 0;
}

static void ioapic_write(u32 reg, u32 v)
{
	mmio_write32(IOAPIC, reg);
	mmio_write32(IOAPIC + 0x10, v);
}

u32 ioapic_read(u32 reg)
{
	mmio_write32(IOAPIC, reg);
	return mmio_read32(IOAPIC + 0x10);
}

/* Loads the IDT and software-enables the local APIC. */
void irq_setup(void)
{
	u16 cs;
	__asm__ volatile("mov %%cs, %0" : "=r"(cs));
	set_gate(VEC_DEV, irq_stub_dev, cs);
	set_gate(VEC_TIMER, irq_stub_timer, cs);
	struct __attribute__((packed)) { u16 limit; u64 base; } d = { sizeof(idt) - 1, (u64)idt };
	__asm__ volatile("lidt %0" : : "m"(d));
	mmio_write32(LAPIC + LAPIC_SVR, mmio_read32(LAPIC + LAPIC_SVR) | 0x1ff);
	mmio_write32(LAPIC + LAPIC_TPR, 0);
}

/* Routes IOAPIC pin `pin` to VEC_DEV on APIC 0; `base` is the device to ack. */
void irq_route(u32 pin, int level, u64 base)
{
	dev_base = base;
	dev_pin = pin;
	ioapic_write(0x10 + 2 * pin + 1, 0);
	ioapic_write(0x10 + 2 * pin, VEC_DEV | (level ? 1u << 15 : 0));
}

void irq_mask(u32 pin) { ioapic_write(0x10 + 2 * pin, 1u << 16); }

/* Remote IRR (bit 14) of the routed entry as the handler saw it. */
u32 irq_rte_seen(void) { return rte_in_handler; }
u32 irq_count(void) { return all_count; }
u32 irq_late(void) { return late; }

/*
 * Called from irq_stub_dev: ack the virtio interrupt, then EOI. Only
 * interrupts with the used-buffer status bit set count as completions.
 */
void irq_dev(void)
{
	all_count++;
	rte_in_handler = ioapic_read(0x10 + 2 * dev_pin);
	u32 st = mmio_read32(dev_base + 0x60);
	if (st & 1)
		dev_count++;
	mmio_write32(dev_base + 0x64, st);
	mmio_write32(LAPIC + LAPIC_EOI, 0);
}

void irq_timer(void)
{
	timer_fired = 1;
	mmio_write32(LAPIC + LAPIC_EOI, 0);
}

/* Sleeps in hlt until the completion count passes `seen`; 0 on timeout. */
int irq_wait(u32 seen)
{
	timer_fired = 0;
	mmio_write32(LAPIC + LAPIC_TIMER_DIV, 0xb); /* divide by 1 */
	mmio_write32(LAPIC + LAPIC_LVT_TIMER, VEC_TIMER); /* one-shot */
	mmio_write32(LAPIC + LAPIC_TIMER_INIT, 0xffffffffu);
	for (;;) {
		__asm__ volatile("cli" ::: "memory");
		if (dev_count != seen || timer_fired)
			break;
		__asm__ volatile("sti; hlt" ::: "memory");
	}
	mmio_write32(LAPIC + LAPIC_TIMER_INIT, 0);
	if (timer_fired && dev_count != seen)
		late++; /* the completion came, but only once the watchdog woke us */
	return dev_count != seen;
}

/*
 * Sleeps in hlt until done() holds, woken every 100 ms by a periodic local
 * APIC timer (KVM's APIC bus runs at 1 GHz) to check. A sleeping vCPU costs
 * the host nothing between wake-ups.
 */
void irq_sleep_until(int (*done)(void))
{
	mmio_write32(LAPIC + LAPIC_TIMER_DIV, 0xb); /* divide by 1 */
	mmio_write32(LAPIC + LAPIC_LVT_TIMER, VEC_TIMER | (1u << 17)); /* periodic */
	mmio_write32(LAPIC + LAPIC_TIMER_INIT, 100000000u);
	for (;;) {
		__asm__ volatile("cli" ::: "memory");
		if (done())
			break;
		__asm__ volatile("sti; hlt" ::: "memory");
	}
	mmio_write32(LAPIC + LAPIC_TIMER_INIT, 0);
}
