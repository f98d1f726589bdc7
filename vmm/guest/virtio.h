/* runv test guest: virtio-mmio (version 2) transport shared by the drivers. */
#ifndef RUNV_VIRTIO_H
#define RUNV_VIRTIO_H

#include "guest.h"

#define R_MAGIC 0x000
#define R_VERSION 0x004
#define R_DEVICE_ID 0x008
#define R_DEV_FEAT 0x010
#define R_DEV_FEAT_SEL 0x014
#define R_DRV_FEAT 0x020
#define R_DRV_FEAT_SEL 0x024
#define R_QSEL 0x030
#define R_QNUM_MAX 0x034
#define R_QNUM 0x038
#define R_QREADY 0x044
#define R_NOTIFY 0x050
#define R_STATUS 0x070
#define R_QDESC_LO 0x080
#define R_QDESC_HI 0x084
#define R_QAVAIL_LO 0x090
#define R_QAVAIL_HI 0x094
#define R_QUSED_LO 0x0a0
#define R_QUSED_HI 0x0a4
#define R_CONFIG 0x100

#define QSZ 8
#define F_NEXT 1
#define F_WRITE 2
#define MAX_DEVS 32

struct desc { u64 addr; u32 len; u16 flags; u16 next; };
struct vring {
	struct desc desc[QSZ];
	struct { u16 flags, idx, ring[QSZ]; } avail;
	u8 pad[4096 - QSZ * 16 - 4 - 2 * QSZ];
	struct { u16 flags, idx; struct { u32 id, len; } ring[QSZ]; } used;
} __attribute__((aligned(4096)));

#define MAX_QUEUES 3
struct dev {
	u64 base;
	u32 irq;
	u32 type, features;
	struct vring *vr; /* queue 0 */
	struct vring *q[MAX_QUEUES];
	u16 avail_idx[MAX_QUEUES], used_seen[MAX_QUEUES];
};

/* A virtio-vsock packet header (44 bytes, little endian). */
struct vsock_hdr {
	u64 src_cid, dst_cid;
	u32 src_port, dst_port, len;
	u16 type, op;
	u32 flags, buf_alloc, fwd_cnt;
} __attribute__((packed));

#define VSOCK_OP_REQUEST 1
#define VSOCK_OP_RESPONSE 2
#define VSOCK_OP_RST 3
#define VSOCK_OP_SHUTDOWN 4
#define VSOCK_OP_RW 5
#define VSOCK_OP_CREDIT_UPDATE 6
#define VSOCK_OP_CREDIT_REQUEST 7

#define MAX_RINGS 12
/* The devices the command line names (discover()). */
extern struct dev devs[MAX_DEVS];
extern int ndevs;

/* Waits are bounded by TSC cycles: about 5-10 s on current hardware. */
#define WAIT_CYCLES 20000000000ul

u64 rdtsc(void);
u32 rd(struct dev *d, u32 r);
void wr(struct dev *d, u32 r, u32 v);
void discover(const char *cmdline);
int dev_init(struct dev *d, u32 want_features, int nqueues);
void post(struct dev *d, int n, u16 id);
int wait_used(struct dev *d, int n, u32 *id, u32 *len);

/*
 * vsock.c: one listening port, one host connection at a time (a new
 * connection replaces the old one). vs_next() handles received packets and
 * returns the next event; the data of a VS_DATA event stays valid until the
 * next call. vs_write() sends what the host's credit allows.
 */
enum { VS_NONE, VS_CONNECTED, VS_DATA, VS_CLOSED };
struct vs_event {
	int kind;
	u32 peer_port;
	const u8 *data;
	u32 len;
};
int vs_listen(const char *cmdline, u32 port);
int vs_next(struct vs_event *ev);
int vs_pending(void);
int vs_connected(void);
u32 vs_write(const u8 *data, u32 len);
void vs_close(void);

#endif
