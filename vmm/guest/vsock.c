/*
 * runv test guest: a listening virtio-vsock driver.
 *
 * Under runv-vmm (hybrid vsock) a host client connects through the VM's unix
 * socket with `CONNECT <port>`; the device then sends the guest a REQUEST
 * from host CID 2 and a fresh host port, and the guest's RESPONSE completes
 * the connection. This driver listens on one port and keeps one connection:
 * a REQUEST while one is open resets the old one and accepts the new one (a
 * host that lost its connection and reconnects). Packets for anything else
 * (another port, a connection that is gone) are answered with RST.
 *
 * Credit, both ways: the guest advertises VS_BUF_ALLOC bytes and consumes
 * every byte as it arrives, so its fwd_cnt is everything received; it tells
 * the host with a CREDIT_UPDATE once the host has used a quarter of its
 * credit since the guest's last packet, and answers CREDIT_REQUEST. It sends
 * only within the host's buf_alloc - (tx_cnt - fwd_cnt); when that is used
 * up it asks with a CREDIT_REQUEST, and again about every second while it
 * stays used up (the host also sends CREDIT_UPDATE by itself as it drains).
 *
 * Transmit is synchronous (runv-vmm completes TX on the notifying vCPU);
 * received packets are taken from the used ring by vs_next(), and the
 * device's interrupt (level-triggered through the IOAPIC, irq.c) wakes a
 * guest sleeping in irq_sleep(). The caller has run irq_setup() and
 * irq_tick_start() (the credit request is repeated on its ticks).
 */
#include "guest.h"
#include "virtio.h"

#define RXQ 0
#define TXQ 1
#define EVQ 2
#define HOST_CID 2
#define VS_BUF_ALLOC 65536u
#define VS_PAYLOAD 4096u
#define HDR ((u32)sizeof(struct vsock_hdr))

static struct dev *vs;
static u64 cid;
static u32 listen_port;
static u8 rx_bufs[QSZ][sizeof(struct vsock_hdr) + VS_PAYLOAD];
static u8 tx_buf[sizeof(struct vsock_hdr) + VS_PAYLOAD];
static u8 ev_buf[8];
static int held = -1; /* RX buffer of the last VS_DATA event */

static struct {
	int open;
	u32 peer;                          /* the host's port */
	u32 peer_buf_alloc, peer_fwd_cnt;  /* the host's receive credit */
	u32 tx_cnt;                        /* bytes sent to the host */
	u32 fwd_cnt;                       /* bytes received and consumed */
	u32 fwd_told;                      /* fwd_cnt in the last packet sent */
	int credit_asked;
	u32 asked_at;                      /* irq_ticks() of the last request */
} c;

static void send_pkt(u32 src, u32 dst, u16 op, u32 flags, const u8 *data, u32 len)
{
	struct vsock_hdr *h = (struct vsock_hdr *)tx_buf;
	int current = c.open && dst == c.peer && src == listen_port;
	memset(h, 0, sizeof(*h));
	h->src_cid = cid;
	h->dst_cid = HOST_CID;
	h->src_port = src;
	h->dst_port = dst;
	h->len = len;
	h->type = 1; /* stream */
	h->op = op;
	h->flags = flags;
	h->buf_alloc = VS_BUF_ALLOC;
	h->fwd_cnt = current ? c.fwd_cnt : 0;
	if (current)
		c.fwd_told = c.fwd_cnt;
	memcpy(tx_buf + HDR, data, len);
	struct vring *tx = vs->q[TXQ];
	tx->desc[0].addr = (u64)tx_buf;
	tx->desc[0].len = HDR + len;
	tx->desc[0].flags = 0;
	post(vs, TXQ, 0);
	u32 id, ulen;
	if (!wait_used(vs, TXQ, &id, &ulen))
		fail("vsock: transmit did not complete");
}

static void reply(const struct vsock_hdr *to, u16 op)
{
	send_pkt(to->dst_port, to->src_port, op, 0, 0, 0);
}

/* Finds the vsock device, posts the receive and event buffers, routes its
 * interrupt; 0 when the VM has none. */
int vs_listen(const char *cmdline, u32 port)
{
	discover(cmdline);
	for (int i = 0; i < ndevs && !vs; i++)
		if (rd(&devs[i], R_MAGIC) == 0x74726976 && rd(&devs[i], R_DEVICE_ID) == 19)
			vs = &devs[i];
	if (!vs)
		return 0;
	if (!dev_init(vs, 0, 3))
		fail("virtio-vsock init");
	cid = (u64)rd(vs, R_CONFIG) | ((u64)rd(vs, R_CONFIG + 4) << 32);
	listen_port = port;
	struct vring *rx = vs->q[RXQ];
	for (u16 i = 0; i < QSZ; i++) {
		rx->desc[i].addr = (u64)rx_bufs[i];
		rx->desc[i].len = sizeof(rx_bufs[i]);
		rx->desc[i].flags = F_WRITE;
		post(vs, RXQ, i);
	}
	struct vring *ev = vs->q[EVQ];
	ev->desc[0].addr = (u64)ev_buf;
	ev->desc[0].len = sizeof(ev_buf);
	ev->desc[0].flags = F_WRITE;
	post(vs, EVQ, 0);
	irq_route(vs->irq, 1, vs->base);
	puts("runv-guest: virtio-vsock cid=");
	putdec(cid);
	puts(" listening on port ");
	putdec(port);
	puts("\n");
	return 1;
}

/* A received packet is waiting (asked with interrupts off before sleeping). */
int vs_pending(void)
{
	barrier();
	return vs && *(volatile u16 *)&vs->q[RXQ]->used.idx != vs->used_seen[RXQ];
}

int vs_connected(void) { return c.open; }

/* Handles received packets until one is an event for the caller; VS_NONE
 * (and 0) when the ring is empty. */
int vs_next(struct vs_event *ev)
{
	ev->kind = VS_NONE;
	if (held >= 0) {
		post(vs, RXQ, (u16)held);
		held = -1;
	}
	while (vs_pending()) {
		struct vring *rx = vs->q[RXQ];
		u16 slot = vs->used_seen[RXQ] % QSZ;
		u32 id = rx->used.ring[slot].id, len = rx->used.ring[slot].len;
		vs->used_seen[RXQ]++;
		if (id >= QSZ)
			fail("vsock: the device used a buffer it was never given");
		struct vsock_hdr *h = (struct vsock_hdr *)rx_bufs[id];
		if (len < HDR || h->len > len - HDR) {
			puts("runv-guest: vsock: a malformed packet, dropped\n");
			post(vs, RXQ, (u16)id);
			continue;
		}
		int current = c.open && h->src_port == c.peer && h->dst_port == listen_port;
		if (current) {
			c.peer_buf_alloc = h->buf_alloc;
			c.peer_fwd_cnt = h->fwd_cnt;
		}
		switch (h->op) {
		case VSOCK_OP_REQUEST:
			if (h->dst_port != listen_port || h->src_cid != HOST_CID) {
				reply(h, VSOCK_OP_RST);
				break;
			}
			if (c.open)
				send_pkt(listen_port, c.peer, VSOCK_OP_RST, 0, 0, 0);
			memset(&c, 0, sizeof(c));
			c.open = 1;
			c.peer = h->src_port;
			c.peer_buf_alloc = h->buf_alloc;
			c.peer_fwd_cnt = h->fwd_cnt;
			reply(h, VSOCK_OP_RESPONSE);
			post(vs, RXQ, (u16)id);
			ev->kind = VS_CONNECTED;
			ev->peer_port = c.peer;
			return 1;
		case VSOCK_OP_RW:
			if (!current) {
				reply(h, VSOCK_OP_RST);
				break;
			}
			c.fwd_cnt += h->len;
			if (c.fwd_cnt - c.fwd_told >= VS_BUF_ALLOC / 4)
				reply(h, VSOCK_OP_CREDIT_UPDATE);
			held = (int)id;
			ev->kind = VS_DATA;
			ev->peer_port = c.peer;
			ev->data = rx_bufs[id] + HDR;
			ev->len = h->len;
			return 1;
		case VSOCK_OP_CREDIT_UPDATE:
			break; /* the credit was taken from the header above */
		case VSOCK_OP_CREDIT_REQUEST:
			reply(h, current ? VSOCK_OP_CREDIT_UPDATE : VSOCK_OP_RST);
			break;
		case VSOCK_OP_SHUTDOWN:
		case VSOCK_OP_RST:
			if (h->op == VSOCK_OP_SHUTDOWN)
				reply(h, VSOCK_OP_RST);
			if (current) {
				c.open = 0;
				post(vs, RXQ, (u16)id);
				ev->kind = VS_CLOSED;
				ev->peer_port = h->src_port;
				return 1;
			}
			break;
		default:
			if (!current)
				reply(h, VSOCK_OP_RST);
			break;
		}
		post(vs, RXQ, (u16)id);
	}
	return 0;
}

/* Sends up to `len` bytes within the host's credit; returns how many. */
u32 vs_write(const u8 *data, u32 len)
{
	if (!c.open || !len)
		return 0;
	u32 in_flight = c.tx_cnt - c.peer_fwd_cnt;
	u32 credit = c.peer_buf_alloc > in_flight ? c.peer_buf_alloc - in_flight : 0;
	if (!credit) {
		if (!c.credit_asked || irq_ticks() - c.asked_at >= 10) {
			send_pkt(listen_port, c.peer, VSOCK_OP_CREDIT_REQUEST, 0, 0, 0);
			c.credit_asked = 1;
			c.asked_at = irq_ticks();
		}
		return 0;
	}
	c.credit_asked = 0;
	u32 n = len < credit ? len : credit;
	if (n > VS_PAYLOAD)
		n = VS_PAYLOAD;
	send_pkt(listen_port, c.peer, VSOCK_OP_RW, 0, data, n);
	c.tx_cnt += n;
	return n;
}

/* Shuts the connection down both ways and forgets it. */
void vs_close(void)
{
	if (!c.open)
		return;
	send_pkt(listen_port, c.peer, VSOCK_OP_SHUTDOWN, 3, 0, 0);
	c.open = 0;
}
