/*
 * runv test guest: virtio-mmio (version 2) drivers for the device steps.
 * Devices are found from `virtio_mmio.device=SIZE@ADDR:IRQ` on the command line,
 * as Linux finds them. Completion is polled (the used ring), except for the
 * virtio-rng step with `irq=edge|level`, which waits for the device's
 * interrupt through the IOAPIC (irq.c).
 */
#include "guest.h"
#include "virtio.h"

static struct vring rings[MAX_RINGS];
static int next_ring;
struct dev devs[MAX_DEVS];
int ndevs;

u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}

#define BUF_SIZE 65536
static u8 buf_a[BUF_SIZE] __attribute__((aligned(4096)));
static u8 buf_b[BUF_SIZE] __attribute__((aligned(4096)));
static struct { u32 type, reserved; u64 sector; } blk_hdr __attribute__((aligned(16)));
static volatile u8 blk_status;

u32 rd(struct dev *d, u32 r) { return mmio_read32(d->base + r); }
void wr(struct dev *d, u32 r, u32 v) { mmio_write32(d->base + r, v); }

static u64 parse_hex(const char *p, const char **end)
{
	u64 v = 0;
	if (p[0] == '0' && p[1] == 'x')
		p += 2;
	for (;; p++) {
		char c = *p;
		if (c >= '0' && c <= '9') v = v * 16 + (u64)(c - '0');
		else if (c >= 'a' && c <= 'f') v = v * 16 + (u64)(c - 'a' + 10);
		else break;
	}
	*end = p;
	return v;
}

/* Finds every `virtio_mmio.device=4K@ADDR:IRQ` on the command line (once). */
void discover(const char *cmdline)
{
	static const char key[] = "virtio_mmio.device=";
	static int done;
	const char *p = cmdline;
	if (done)
		return;
	done = 1;
	while (*p && ndevs < MAX_DEVS) {
		const char *k = key, *q = p;
		while (*k && *q == *k) { k++; q++; }
		if (!*k) {
			while (*q && *q != '@' && *q != ' ')
				q++;
			if (*q == '@') {
				const char *e;
				devs[ndevs].base = parse_hex(q + 1, &e);
				if (*e == ':')
					for (e++; *e >= '0' && *e <= '9'; e++)
						devs[ndevs].irq = devs[ndevs].irq * 10 + (u32)(*e - '0');
				ndevs++;
				p = e;
				continue;
			}
		}
		p++;
	}
}

int dev_init(struct dev *d, u32 want_features, int nqueues)
{
	if (rd(d, R_MAGIC) != 0x74726976 || rd(d, R_VERSION) != 2)
		return 0;
	d->type = rd(d, R_DEVICE_ID);
	wr(d, R_STATUS, 0);
	wr(d, R_STATUS, 1);
	wr(d, R_STATUS, 3);
	wr(d, R_DEV_FEAT_SEL, 1);
	if (!(rd(d, R_DEV_FEAT) & 1))
		return 0;
	wr(d, R_DEV_FEAT_SEL, 0);
	d->features = rd(d, R_DEV_FEAT);
	wr(d, R_DRV_FEAT_SEL, 0);
	wr(d, R_DRV_FEAT, d->features & want_features);
	wr(d, R_DRV_FEAT_SEL, 1);
	wr(d, R_DRV_FEAT, 1);
	wr(d, R_STATUS, 1 | 2 | 8);
	if (!(rd(d, R_STATUS) & 8))
		return 0;
	for (int n = 0; n < nqueues && n < MAX_QUEUES; n++) {
		if (!d->q[n]) {
			if (next_ring >= MAX_RINGS)
				return 0;
			d->q[n] = &rings[next_ring++];
		}
		struct vring *vr = d->q[n];
		wr(d, R_QSEL, (u32)n);
		if (rd(d, R_QNUM_MAX) < QSZ)
			return 0;
		memset(vr, 0, sizeof(*vr));
		d->avail_idx[n] = d->used_seen[n] = 0;
		wr(d, R_QNUM, QSZ);
		wr(d, R_QDESC_LO, (u32)(u64)vr->desc);
		wr(d, R_QDESC_HI, 0);
		wr(d, R_QAVAIL_LO, (u32)(u64)&vr->avail);
		wr(d, R_QAVAIL_HI, 0);
		wr(d, R_QUSED_LO, (u32)(u64)&vr->used);
		wr(d, R_QUSED_HI, 0);
		wr(d, R_QREADY, 1);
	}
	d->vr = d->q[0];
	wr(d, R_STATUS, 1 | 2 | 8 | 4);
	return 1;
}

/* Makes descriptor `id` of queue `n` available and notifies. */
void post(struct dev *d, int n, u16 id)
{
	struct vring *vr = d->q[n];
	vr->avail.ring[d->avail_idx[n] % QSZ] = id;
	barrier();
	vr->avail.idx = ++d->avail_idx[n];
	barrier();
	wr(d, R_NOTIFY, (u32)n);
}

/* Polls queue `n` for one used element; returns 0 on timeout. */
int wait_used(struct dev *d, int n, u32 *id, u32 *len)
{
	struct vring *vr = d->q[n];
	u64 deadline = rdtsc() + WAIT_CYCLES;
	while (rdtsc() < deadline) {
		barrier();
		if (*(volatile u16 *)&vr->used.idx != d->used_seen[n]) {
			*id = vr->used.ring[d->used_seen[n] % QSZ].id;
			*len = vr->used.ring[d->used_seen[n] % QSZ].len;
			d->used_seen[n]++;
			return 1;
		}
	}
	return 0;
}

static void set_desc(struct dev *d, int i, void *addr, u32 len, u16 flags)
{
	d->vr->desc[i].addr = (u64)addr;
	d->vr->desc[i].len = len;
	d->vr->desc[i].flags = flags;
	d->vr->desc[i].next = (u16)(i + 1);
}

/* Publishes the chain at descriptor 0 of queue 0 and polls for its completion. */
static u32 submit(struct dev *d)
{
	u32 id, len;
	post(d, 0, 0);
	if (!wait_used(d, 0, &id, &len))
		fail("virtio request timed out");
	return len;
}

static u8 blk_rw(struct dev *d, u32 type, u64 sector, void *data, u32 len)
{
	blk_hdr.type = type;
	blk_hdr.reserved = 0;
	blk_hdr.sector = sector;
	blk_status = 0xff;
	set_desc(d, 0, &blk_hdr, 16, F_NEXT);
	if (len) {
		set_desc(d, 1, data, len, F_NEXT | (type == 0 ? F_WRITE : 0));
		set_desc(d, 2, (void *)&blk_status, 1, F_WRITE);
	} else {
		set_desc(d, 1, (void *)&blk_status, 1, F_WRITE);
	}
	submit(d);
	return blk_status;
}

static u8 pattern(u64 i) { return (u8)((i * 7 + 3) ^ 0x5a); }

/* Sector 8 onward gets the pattern; sector 1 holds what the host wrote. */
static void blk_test(struct dev *d)
{
	u64 cap = (u64)rd(d, R_CONFIG) | ((u64)rd(d, R_CONFIG + 4) << 32);
	int ro = (d->features >> 5) & 1;
	puts("runv-guest: virtio-blk sectors=");
	putdec(cap);
	puts(ro ? " ro\n" : " rw\n");
	if (blk_rw(d, 0, 1, buf_b, 512))
		fail("virtio-blk read of sector 1");
	puts("runv-guest: virtio-blk sector1=");
	for (int i = 0; i < 32 && buf_b[i] >= 32 && buf_b[i] < 127; i++)
		putc((char)buf_b[i]);
	puts("\n");
	/* The 32-bit word at byte 1024, where erofs keeps its superblock magic. */
	if (cap > 2) {
		if (blk_rw(d, 0, 2, buf_b, 512))
			fail("virtio-blk read of sector 2");
		puts("runv-guest: virtio-blk magic1024=");
		puthex((u64)buf_b[0] | (u64)buf_b[1] << 8 | (u64)buf_b[2] << 16 | (u64)buf_b[3] << 24);
		puts("\n");
	}
	for (u64 i = 0; i < 4096; i++)
		buf_a[i] = pattern(i);
	u8 st = blk_rw(d, 1, 8, buf_a, 4096);
	if (ro) {
		if (st != 1)
			fail("virtio-blk write to a read-only disk was not refused");
		puts("runv-guest: virtio-blk ro write refused\n");
		return;
	}
	if (st)
		fail("virtio-blk write");
	memset(buf_b, 0, 4096);
	if (blk_rw(d, 0, 8, buf_b, 4096))
		fail("virtio-blk read back");
	for (u64 i = 0; i < 4096; i++)
		if (buf_b[i] != pattern(i))
			fail("virtio-blk pattern mismatch");
	if ((d->features >> 9) & 1) {
		if (blk_rw(d, 4, 0, 0, 0))
			fail("virtio-blk flush");
		puts("runv-guest: virtio-blk flush ok\n");
	}
	if (blk_rw(d, 0, cap, buf_b, 512) != 1)
		fail("virtio-blk read past the end was not refused");
	puts("runv-guest: virtio-blk pattern ok\n");
}

/* Sequential write then read of `mb` MiB in 64 KiB requests, for the benchmark. */
static void blk_bench(struct dev *d, u64 mb)
{
	u64 n = mb * 16;
	puts("runv-guest: blkbench write start\n");
	for (u64 i = 0; i < n; i++)
		if (blk_rw(d, 1, i * 128, buf_a, BUF_SIZE))
			fail("blkbench write");
	puts("runv-guest: blkbench write done\n");
	for (u64 i = 0; i < n; i++)
		if (blk_rw(d, 0, i * 128, buf_b, BUF_SIZE))
			fail("blkbench read");
	puts("runv-guest: blkbench read done\n");
}

static void rng_test(struct dev *d)
{
	static u8 a[32], b[32];
	set_desc(d, 0, a, 32, F_WRITE);
	d->vr->desc[0].flags = F_WRITE;
	if (submit(d) != 32)
		fail("virtio-rng short read");
	set_desc(d, 0, b, 32, F_WRITE);
	d->vr->desc[0].flags = F_WRITE;
	if (submit(d) != 32)
		fail("virtio-rng short read");
	int zero = 1, same = 1;
	for (int i = 0; i < 32; i++) {
		if (a[i]) zero = 0;
		if (a[i] != b[i]) same = 0;
	}
	if (zero || same)
		fail("virtio-rng bytes are not random");
	puts("runv-guest: virtio-rng ok ");
	for (int i = 0; i < 4; i++)
		puthex(a[i]);
	puts("\n");
}

/*
 * virtio-rng, interrupt-driven: two requests, each awaited with hlt until the
 * IOAPIC delivers the device's interrupt. With a level-triggered entry the
 * second one only arrives if the EOI of the first cleared remote IRR. The
 * interrupt count may exceed 2: an EOI that reaches the IOAPIC before the
 * acknowledgement lowered the line re-delivers (as the 82093AA does).
 */
static void rng_irq_test(struct dev *d, int level)
{
	static u8 a[16];
	irq_setup();
	irq_route(d->irq, level, d->base);
	u32 seen_irr = 0;
	for (u32 n = 0; n < 2; n++) {
		set_desc(d, 0, a, sizeof(a), F_WRITE);
		d->vr->desc[0].flags = F_WRITE;
		post(d, 0, 0);
		if (!irq_wait(n))
			fail("virtio-rng interrupt did not arrive");
		if (level)
			seen_irr |= (irq_rte_seen() >> 14) & 1;
		u32 id, len;
		if (*(volatile u16 *)&d->vr->used.idx == d->used_seen[0] || !wait_used(d, 0, &id, &len))
			fail("virtio-rng interrupt without a used buffer");
		if (len != sizeof(a))
			fail("virtio-rng short read");
	}
	irq_mask(d->irq);
	puts("runv-guest: virtio-rng irq ");
	puts(level ? "level" : "edge");
	puts(" pin=");
	putdec(d->irq);
	puts(" completions=2 remote_irr=");
	putdec(seen_irr);
	puts(" interrupts=");
	putdec(irq_count());
	puts(" late=");
	putdec(irq_late());
	puts("\n");
}

/* virtio-net: wait for the host's frame (ethertype 0x88b5), answer it. */
#define NET_RX_BUFS 4
static u8 net_rx[NET_RX_BUFS][2048];
static u8 net_tx[2048];

/*
 * net=relay: for each 0x88b5 frame to this guest's MAC whose payload starts
 * with "runv-relay:", send the rest of the payload out verbatim as a frame of
 * its own, one line per frame. Tests craft any frame (a spoofed source, an ARP, a datagram to
 * anywhere) and have it leave through the guest's real tap. Bounded: at most
 * NET_RELAY_MAX frames, and it stops after NET_RELAY_IDLE empty waits.
 */
#define NET_RELAY_MAX 64
#define NET_RELAY_IDLE 30
static void net_relay(struct dev *d, const u8 *mac)
{
	static const char mark[] = "runv-relay:";
	const u32 m = sizeof(mark) - 1;
	u32 relayed = 0, idle = 0;
	puts("runv-guest: virtio-net relay ready\n");
	while (relayed < NET_RELAY_MAX && idle < NET_RELAY_IDLE) {
		u32 id, len;
		if (!wait_used(d, 0, &id, &len)) {
			idle++;
			continue;
		}
		idle = 0;
		u8 *f = net_rx[id % NET_RX_BUFS] + 12;
		u32 flen = len > 12 && len <= sizeof(net_rx[0]) ? len - 12 : 0;
		int to_us = 1;
		for (int i = 0; i < 6 && flen >= 6; i++)
			to_us &= f[i] == mac[i];
		if (to_us && flen >= 14 + m + 14 && f[12] == 0x88 && f[13] == 0xb5 &&
		    str_eq((const char *)f + 14, (int)m, mark)) {
			u32 n = flen - 14 - m;
			memset(net_tx, 0, 12);
			memcpy(net_tx + 12, f + 14 + m, n);
			struct vring *tx = d->q[1];
			tx->desc[0].addr = (u64)net_tx;
			tx->desc[0].len = 12 + n;
			tx->desc[0].flags = 0;
			post(d, 1, 0);
			u32 tid, tlen;
			if (!wait_used(d, 1, &tid, &tlen))
				fail("virtio-net: transmit did not complete");
			relayed++;
			puts("runv-guest: virtio-net relayed frame ");
			putdec(relayed);
			puts("\n");
		}
		post(d, 0, (u16)(id % NET_RX_BUFS));
	}
	puts("runv-guest: virtio-net relay done\n");
}

static void net_test(struct dev *d)
{
	u8 mac[6];
	for (int i = 0; i < 6; i++)
		mac[i] = *(volatile u8 *)(d->base + R_CONFIG + (u64)i);
	puts("runv-guest: virtio-net mac=");
	for (int i = 0; i < 6; i++) {
		putc("0123456789abcdef"[mac[i] >> 4]);
		putc("0123456789abcdef"[mac[i] & 15]);
		if (i < 5)
			putc(':');
	}
	puts("\n");
	struct vring *rx = d->q[0];
	for (u16 i = 0; i < NET_RX_BUFS; i++) {
		rx->desc[i].addr = (u64)net_rx[i];
		rx->desc[i].len = sizeof(net_rx[i]);
		rx->desc[i].flags = F_WRITE;
		rx->desc[i].next = 0;
		post(d, 0, i);
	}
	int mlen;
	const char *mode = cmdline_get("net", &mlen);
	if (mode && str_eq(mode, mlen, "relay")) {
		net_relay(d, mac);
		return;
	}
	for (;;) {
		u32 id, len;
		if (!wait_used(d, 0, &id, &len))
			fail("virtio-net: no frame from the host");
		u8 *f = net_rx[id % NET_RX_BUFS] + 12;
		u32 flen = len > 12 ? len - 12 : 0;
		if (flen >= 14 && f[12] == 0x88 && f[13] == 0xb5) {
			puts("runv-guest: virtio-net got ");
			for (u32 i = 14; i < flen && i < 64 && f[i] >= 32 && f[i] < 127; i++)
				putc((char)f[i]);
			puts("\n");
			/* Reply: to the sender, from us, same ethertype. */
			static const char msg[] = "runv-guest-pong";
			u8 *o = net_tx + 12;
			memset(net_tx, 0, 12);
			memcpy(o, f + 6, 6);
			memcpy(o + 6, mac, 6);
			o[12] = 0x88;
			o[13] = 0xb5;
			memcpy(o + 14, msg, sizeof(msg) - 1);
			struct vring *tx = d->q[1];
			tx->desc[0].addr = (u64)net_tx;
			tx->desc[0].len = 12 + 14 + sizeof(msg) - 1;
			tx->desc[0].flags = 0;
			post(d, 1, 0);
			if (!wait_used(d, 1, &id, &len))
				fail("virtio-net: transmit did not complete");
			puts("runv-guest: virtio-net sent pong\n");
			return;
		}
		post(d, 0, (u16)(id % NET_RX_BUFS)); /* not ours: recycle the buffer */
	}
}

/* virtio-vsock: connect to the host's port 1234, say hello, read the answer. */
#define VS_RX_BUFS 4
static u8 vs_rx[VS_RX_BUFS][sizeof(struct vsock_hdr) + 4096];
static u8 vs_tx[sizeof(struct vsock_hdr) + 256];
static u8 vs_ev[8];

static u32 vs_src = 1025, vs_dst = 1234;

static void vsock_send(struct dev *d, u64 cid, u16 op, u32 flags, const char *data, u32 len, u32 fwd)
{
	struct vsock_hdr *h = (struct vsock_hdr *)vs_tx;
	u32 id, ulen;
	memset(h, 0, sizeof(*h));
	h->src_cid = cid;
	h->dst_cid = 2;
	h->src_port = vs_src;
	h->dst_port = vs_dst;
	h->len = len;
	h->type = 1;
	h->op = op;
	h->flags = flags;
	h->buf_alloc = VS_RX_BUFS * 4096;
	h->fwd_cnt = fwd;
	memcpy(vs_tx + sizeof(*h), data, len);
	struct vring *tx = d->q[1];
	tx->desc[0].addr = (u64)vs_tx;
	tx->desc[0].len = (u32)sizeof(*h) + len;
	tx->desc[0].flags = 0;
	post(d, 1, 0);
	if (!wait_used(d, 1, &id, &ulen))
		fail("vsock: transmit did not complete");
}

/* Waits for the next packet; returns its header (in its RX buffer). */
static struct vsock_hdr *vsock_recv(struct dev *d, u16 *slot)
{
	u32 id, len;
	if (!wait_used(d, 0, &id, &len))
		fail("vsock: nothing received");
	*slot = (u16)(id % VS_RX_BUFS);
	return (struct vsock_hdr *)vs_rx[*slot];
}

static void vsock_test(struct dev *d)
{
	u64 cid = (u64)rd(d, R_CONFIG) | ((u64)rd(d, R_CONFIG + 4) << 32);
	puts("runv-guest: virtio-vsock cid=");
	putdec(cid);
	puts("\n");
	struct vring *rx = d->q[0];
	for (u16 i = 0; i < VS_RX_BUFS; i++) {
		rx->desc[i].addr = (u64)vs_rx[i];
		rx->desc[i].len = sizeof(vs_rx[i]);
		rx->desc[i].flags = F_WRITE;
		post(d, 0, i);
	}
	struct vring *ev = d->q[2];
	ev->desc[0].addr = (u64)vs_ev;
	ev->desc[0].len = sizeof(vs_ev);
	ev->desc[0].flags = F_WRITE;
	post(d, 2, 0);

	u16 slot;
	struct vsock_hdr *h;
	int plen;
	const char *listen = cmdline_get("vsock-listen", &plen);
	if (listen) {
		/* Wait for the host's REQUEST to our port, accept it, echo once. */
		u32 port = 0;
		for (int i = 0; i < plen && listen[i] >= '0' && listen[i] <= '9'; i++)
			port = port * 10 + (u32)(listen[i] - '0');
		h = 0;
		for (int tries = 0; tries < 8 && !h; tries++) {
			struct vsock_hdr *r = vsock_recv(d, &slot);
			if (r->op == 1 && r->dst_port == port)
				h = r;
			else
				post(d, 0, slot);
		}
		if (!h)
			fail("vsock: no connection request from the host");
		vs_src = port;
		vs_dst = h->src_port;
		post(d, 0, slot);
		vsock_send(d, cid, 2 /* RESPONSE */, 0, "", 0, 0);
		puts("runv-guest: virtio-vsock accepted host port ");
		putdec(vs_dst);
		puts("\n");
		for (;;) {
			h = vsock_recv(d, &slot);
			if (h->op == 5)
				break;
			if (h->op == 3 || h->op == 4)
				fail("vsock: host closed before sending");
			post(d, 0, slot);
		}
		puts("runv-guest: virtio-vsock host said ");
		u8 *p = (u8 *)h + sizeof(*h);
		for (u32 i = 0; i < h->len && i < 64 && p[i] >= 32 && p[i] < 127; i++)
			putc((char)p[i]);
		puts("\n");
		u32 got = h->len;
		post(d, 0, slot);
		static const char ans[] = "hello from the guest listener";
		vsock_send(d, cid, 5 /* RW */, 0, ans, sizeof(ans) - 1, got);
		vsock_send(d, cid, 4 /* SHUTDOWN */, 3, "", 0, got);
		puts("runv-guest: virtio-vsock listen ok\n");
		return;
	}
	vsock_send(d, cid, 1 /* REQUEST */, 0, "", 0, 0);
	h = vsock_recv(d, &slot);
	if (h->op != 2 /* RESPONSE */)
		fail("vsock: connection refused by the host");
	post(d, 0, slot);
	static const char hello[] = "hello from the guest";
	vsock_send(d, cid, 5 /* RW */, 0, hello, sizeof(hello) - 1, 0);
	for (;;) {
		h = vsock_recv(d, &slot);
		if (h->op == 5) {
			puts("runv-guest: virtio-vsock got ");
			u8 *p = (u8 *)h + sizeof(*h);
			for (u32 i = 0; i < h->len && i < 64 && p[i] >= 32 && p[i] < 127; i++)
				putc((char)p[i]);
			puts("\n");
			u32 got = h->len;
			post(d, 0, slot);
			vsock_send(d, cid, 4 /* SHUTDOWN */, 3, "", 0, got);
			puts("runv-guest: virtio-vsock ok\n");
			return;
		}
		if (h->op == 3 || h->op == 4)
			fail("vsock: host closed the connection before answering");
		post(d, 0, slot); /* credit updates and the like */
	}
}

void virtio_tests(const char *cmdline)
{
	int len;
	const char *bench = cmdline_get("blkbench", &len);
	discover(cmdline);
	for (int i = 0; i < ndevs; i++) {
		struct dev *d = &devs[i];
		if (rd(d, R_MAGIC) == 0x74726976 && rd(d, R_DEVICE_ID) == 0)
			continue; /* an empty transport slot */
		u32 type = rd(d, R_DEVICE_ID);
		int nq = type == 1 ? 2 : type == 19 ? 3 : 1;
		if (!dev_init(d, (1u << 5) | (1u << 9), nq))
			fail("virtio device init");
		if (d->type == 2) {
			if (bench) {
				const char *e;
				u64 mb = 0;
				for (e = bench; *e >= '0' && *e <= '9'; e++)
					mb = mb * 10 + (u64)(*e - '0');
				blk_bench(d, mb);
			} else {
				blk_test(d);
			}
		} else if (d->type == 4) {
			int ilen;
			const char *irq = cmdline_get("irq", &ilen);
			if (irq)
				rng_irq_test(d, str_eq(irq, ilen, "level"));
			else
				rng_test(d);
		} else if (d->type == 1) {
			net_test(d);
		} else if (d->type == 19) {
			vsock_test(d);
		} else {
			puts("runv-guest: skipping virtio device type ");
			putdec(d->type);
			puts("\n");
		}
	}
}

/* The block-device steps of virtio_tests() alone, for test=container with
 * `disks=check`: the root filesystem disk a container VM gets is checked
 * (its superblock, that it refuses writes) before the channel starts. */
void virtio_blk_tests(const char *cmdline)
{
	discover(cmdline);
	for (int i = 0; i < ndevs; i++) {
		struct dev *d = &devs[i];
		if (rd(d, R_MAGIC) != 0x74726976 || rd(d, R_DEVICE_ID) != 2)
			continue;
		if (!dev_init(d, (1u << 5) | (1u << 9), 1))
			fail("virtio device init");
		blk_test(d);
	}
}

/* Posts a looping descriptor chain that points outside guest memory. */
void virtio_garbage(const char *cmdline)
{
	discover(cmdline);
	if (!ndevs || !dev_init(&devs[0], 0, 1))
		fail("no virtio device for bad-virtio");
	struct dev *d = &devs[0];
	d->vr->desc[0].addr = 0xfffffffff000ul;
	d->vr->desc[0].len = 0x100000;
	d->vr->desc[0].flags = F_NEXT;
	d->vr->desc[0].next = 0;
	puts("runv-guest: posting garbage descriptors\n");
	d->vr->avail.ring[0] = 0;
	d->vr->avail.idx = 1;
	barrier();
	wr(d, R_NOTIFY, 0);
	fail("garbage descriptors were accepted");
}
