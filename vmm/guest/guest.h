/* runv test guest: shared helpers (freestanding, no libc). */
#ifndef RUNV_GUEST_H
#define RUNV_GUEST_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline u32 mmio_read32(u64 a) { return *(volatile u32 *)a; }
static inline void mmio_write32(u64 a, u32 v) { *(volatile u32 *)a = v; }
static inline void barrier(void) { __asm__ volatile("mfence" ::: "memory"); }

void putc(char c);
void puts(const char *s);
void puthex(u64 v);
void putdec(u64 v);
void poweroff(void);
void fail(const char *what);
const char *cmdline_get(const char *key, int *len);
int str_eq(const char *a, int alen, const char *b);
void *memset(void *d, int c, u64 n);
void *memcpy(void *d, const void *s, u64 n);

void smp_start(void);
void cpuid(u32 leaf, u32 *a, u32 *b, u32 *c, u32 *d);
void ap_main(void);
void guest_main(int kind, u64 info);

/* interrupts (irq.c) */
void irq_setup(void);
void irq_route(u32 pin, int level, u64 base);
void irq_mask(u32 pin);
int irq_wait(u32 seen);
void irq_route_ged(u32 pin);
int irq_sleep_ged(u32 bits, int (*poll)(void), u32 *wakes);
int power_button(void);
u32 irq_count(void);
u32 irq_late(void);
u32 irq_rte_seen(void);
void irq_tick_start(u32 ms);
u32 irq_ticks(void);
void irq_sleep(int (*ready)(void));

/* virtio tests (virtio.c) */
void virtio_tests(const char *cmdline);
void virtio_blk_tests(const char *cmdline);
void virtio_garbage(const char *cmdline);

/* test=container: the guest side of the node agent's channel (container.c) */
void container_main(const char *cmdline);

#endif
