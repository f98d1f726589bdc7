/*
 * runv test guest: interrupts. An IDT with three vectors, the local APIC
 * (xAPIC MMIO: enable, EOI, a timer as a watchdog) and IOAPIC redirection
 * entries for a virtio device and for the ACPI Generic Event Device (GED), so
 * a virtio device's completion and the host's power button can be awaited
 * with `hlt` instead of polling. Every wait has a watchdog timer: a device
 * wait fails after about 4 s of host time if the interrupt never comes; the
 * power-button sleep polls port 0x601 every 5 s; test=container sleeps
 * between vsock packets (irq_sleep) with a periodic tick as its clock.
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
#define VEC_GED 0x42
/* The GED event register (read to clear; bit 0 = power button), as the
 * DSDT's \_SB.GED_ operation region names it. */
#define GED_EVENT_PORT 0x602

struct gate {
	u16 off0, sel;
	u8 ist, type;
	u16 off1;
	u32 off2, zero;
} __attribute__((packed));

static struct gate idt[256] __attribute__((aligned(16)));
extern char irq_stub_dev[], irq_stub_timer[], irq_stub_ged[];

static volatile u32 dev_count, all_count, timer_fired, rte_in_handler, ged_events, ticks;
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
	set_gate(VEC_GED, irq_stub_ged, cs);
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

/* Routes IOAPIC pin `pin` (the GED's GSI) to VEC_GED on APIC 0: level-triggered,
 * active high, as the GED's Interrupt resource says. */
void irq_route_ged(u32 pin)
{
	ioapic_write(0x10 + 2 * pin + 1, 0);
	ioapic_write(0x10 + 2 * pin, VEC_GED | (1u << 15));
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

/*
 * Called from irq_stub_ged: reading the event register takes the events and
 * lowers the level-triggered line, so the EOI that follows ends the interrupt.
 */
void irq_ged(void)
{
	ged_events |= inb(GED_EVENT_PORT);
	mmio_write32(LAPIC + LAPIC_EOI, 0);
}

void irq_timer(void)
{
	timer_fired = 1;
	ticks++;
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
 * Sleeps in hlt until the GED interrupt reports an event in `bits`; returns 1
 * then. No timer wakes the vCPU for this: a sleeping guest costs the host
 * nothing. The watchdog is a periodic local APIC timer of about 5 s (KVM's APIC
 * bus runs at 1 GHz; divided by 2): on each of its wake-ups, counted in
 * *wakes, `poll()` is asked, and a true answer returns 0 (for a host whose
 * interrupt never came).
 */
int irq_sleep_ged(u32 bits, int (*poll)(void), u32 *wakes)
{
	int via_ged;
	timer_fired = 0;
	mmio_write32(LAPIC + LAPIC_TIMER_DIV, 0x0); /* divide by 2 */
	mmio_write32(LAPIC + LAPIC_LVT_TIMER, VEC_TIMER | (1u << 17)); /* periodic */
	mmio_write32(LAPIC + LAPIC_TIMER_INIT, 2500000000u);
	for (;;) {
		__asm__ volatile("cli" ::: "memory");
		if (ged_events & bits) {
			via_ged = 1;
			break;
		}
		if (timer_fired) {
			timer_fired = 0;
			(*wakes)++;
			if (poll()) {
				via_ged = 0;
				break;
			}
		}
		__asm__ volatile("sti; hlt" ::: "memory");
	}
	mmio_write32(LAPIC + LAPIC_TIMER_INIT, 0);
	return via_ged;
}

/*
 * A periodic local APIC timer, one tick every `ms` milliseconds (KVM's APIC
 * bus runs at 1 GHz): the clock of waits that last (irq_ticks), and a
 * wake-up for a guest sleeping in irq_sleep() whose interrupt got lost.
 */
void irq_tick_start(u32 ms)
{
	mmio_write32(LAPIC + LAPIC_TIMER_DIV, 0xb); /* divide by 1 */
	mmio_write32(LAPIC + LAPIC_LVT_TIMER, VEC_TIMER | (1u << 17)); /* periodic */
	mmio_write32(LAPIC + LAPIC_TIMER_INIT, ms * 1000000u);
}

u32 irq_ticks(void) { return ticks; }

/*
 * Sleeps in hlt until the next interrupt (the routed device, the timer),
 * unless `ready()`, asked with interrupts off, says there is work: an
 * interrupt that comes after that check still ends the hlt.
 */
void irq_sleep(int (*ready)(void))
{
	__asm__ volatile("cli" ::: "memory");
	if (!ready())
		__asm__ volatile("sti; hlt; cli" ::: "memory");
}
