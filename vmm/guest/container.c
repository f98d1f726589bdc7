/*
 * runv test guest: `test=container`, the guest side of the node agent's
 * channel (runv_vmm_api::guest, protocol version 1) over virtio-vsock port
 * 1024, standing in for runv-init where a stock kernel cannot boot. No
 * process runs: the "container" is this guest, and what it reports comes
 * from the command line.
 *
 *   exit=N        the container exits with status N (default 0)
 *   signal=S      ...or dies of signal S instead
 *   out=WORD      a word its stdout and stderr lines carry (default "hello");
 *                 the stdout line also names the Config's length, its
 *                 hostname and the container's argv[0]
 *   run=forever   it keeps running until the host sends Stop (or the
 *                 power button): then it "dies" of SIGTERM (signal 15)
 *   flood=BYTES   after its two lines it writes BYTES more to stdout, in
 *                 Stdout frames of 4 KiB, before it exits: byte i of the
 *                 flood is '\n' when i % 64 == 63, else 'a' + i % 26. It
 *                 writes only while a host is connected and its credit
 *                 allows (runv-init would drop the oldest instead)
 *   disks=check   first run the block-device steps of the default mode on
 *                 every virtio-blk device (superblock bytes, a refused write
 *                 to a read-only disk), as a container VM's root filesystem
 *   bad=length|kind|json
 *                 after its two lines it sends a broken frame (a length
 *                 of 1 MiB, kind 99, an Exited frame that is not JSON)
 *                 and then keeps running, for tests of the host's decoder
 *
 * Frames are `u32 big-endian length | u8 kind | payload`. On every new
 * connection the guest sends Hello with its state (waitingForConfig,
 * running, exited) and, once exited, Exited again. The host's Hello (version
 * 1) must come before anything else; a frame before it, a frame only a
 * guest sends, an unknown kind, a bad length or another version is answered
 * with an Error frame and the connection is closed, as runv-init does. On
 * Config the container starts: Started, one Stdout and one Stderr frame,
 * then (unless run=forever) Exited. Stop before Config reports a start error,
 * Stop while running reports signal 15. ExitAck after Exited powers off; with
 * no acknowledgement the guest powers off after the Config's
 * exitReportTimeoutSeconds (10 s without a Config).
 */
#include "guest.h"
#include "virtio.h"

#define CHAN_PORT 1024
#define MAX_FRAME 65536u
#define TICK_MS 100u
#define FAIL_REPORT_S 10u

enum { K_HELLO = 1, K_CONFIG, K_STARTED, K_STDOUT, K_STDERR, K_EXITED, K_DROPPED, K_STOP, K_EXIT_ACK, K_ERROR };
static const char *const kind_names[] = {
	"", "Hello", "Config", "Started", "Stdout", "Stderr", "Exited", "Dropped", "Stop", "ExitAck", "Error",
};

static enum { WAITING, RUNNING, EXITED } phase;
static struct {
	int code, signal;
	const char *start_error;
} ex;
static u32 exit_report_s = FAIL_REPORT_S, exited_at;

/* From the command line. */
static int want_code, want_signal, forever;
static u64 flood_left, flood_at;
static const char *bad;
static int bad_len;
static const char *word = "hello";
static int word_len = 5;

/* The frame being read, and the connection's state. */
static u8 in[4 + MAX_FRAME];
static u32 in_len;
static int greeted, closing;

/* Bytes for the host not yet sent on this connection. */
static u8 out[16384];
static u32 out_head, out_tail, frame_at;
static int frame_bad;

static u32 slen(const char *s) { u32 n = 0; while (s[n]) n++; return n; }

static void f_bytes(const void *p, u32 n)
{
	if (frame_bad || out_tail + n > sizeof(out)) {
		frame_bad = 1;
		return;
	}
	memcpy(out + out_tail, p, n);
	out_tail += n;
}

static void f_str(const char *s) { f_bytes(s, slen(s)); }

static void f_int(long v)
{
	char buf[24];
	int i = 24;
	unsigned long u = v < 0 ? (unsigned long)-v : (unsigned long)v;
	do { buf[--i] = (char)('0' + u % 10); u /= 10; } while (u);
	if (v < 0)
		buf[--i] = '-';
	f_bytes(buf + i, (u32)(24 - i));
}

static void f_begin(u8 kind)
{
	if (out_head) { /* move what is unsent to the front */
		memcpy(out, out + out_head, out_tail - out_head);
		out_tail -= out_head;
		out_head = 0;
	}
	frame_at = out_tail;
	frame_bad = 0;
	static const u8 hdr[4];
	f_bytes(hdr, 4);
	f_bytes(&kind, 1);
}

static void f_end(void)
{
	if (frame_bad) {
		out_tail = frame_at;
		puts("runv-guest: channel: outbox full, frame dropped\n");
		return;
	}
	u32 len = out_tail - frame_at - 4;
	out[frame_at] = (u8)(len >> 24);
	out[frame_at + 1] = (u8)(len >> 16);
	out[frame_at + 2] = (u8)(len >> 8);
	out[frame_at + 3] = (u8)len;
}

/* The fields of Exited (also the `exited` state of Hello), without braces. */
static void exited_fields(void)
{
	if (ex.start_error) {
		f_str("\"startError\":\"");
		f_str(ex.start_error);
		f_str("\",");
	} else if (ex.signal) {
		f_str("\"signal\":");
		f_int(ex.signal);
		f_str(",");
	} else {
		f_str("\"code\":");
		f_int(ex.code);
		f_str(",");
	}
	f_str("\"oomKilled\":false,\"startedAtNanos\":0,\"finishedAtNanos\":0");
}

static void send_hello(void)
{
	f_begin(K_HELLO);
	f_str("{\"version\":1,\"software\":\"runv-test-guest\",\"state\":{\"phase\":\"");
	if (phase == WAITING) {
		f_str("waitingForConfig\"");
	} else if (phase == RUNNING) {
		f_str("running\",\"pid\":1,\"startedAtNanos\":0");
	} else {
		f_str("exited\",");
		exited_fields();
	}
	f_str("}}");
	f_end();
}

static void send_exited(void)
{
	f_begin(K_EXITED);
	f_str("{");
	exited_fields();
	f_str("}");
	f_end();
}

/* Sends what the host's credit allows; closes once an error is out. */
static void flush(void)
{
	while (out_head < out_tail && vs_connected()) {
		u32 n = vs_write(out + out_head, out_tail - out_head);
		if (!n)
			return;
		out_head += n;
	}
	if (out_head == out_tail)
		out_head = out_tail = 0;
	if (closing && vs_connected() && out_head == out_tail) {
		vs_close();
		closing = 0;
		puts("runv-guest: channel: connection closed\n");
	}
}

/* Answers the host with an Error frame `a N b` (no N when it is negative)
 * and closes the connection once the frame is out. */
static void protocol_error(const char *a, long n, const char *b)
{
	f_begin(K_ERROR);
	f_str(a);
	if (n >= 0)
		f_int(n);
	f_str(b);
	f_end();
	closing = 1;
	puts("runv-guest: channel: closing the host connection: ");
	puts(a);
	if (n >= 0)
		putdec((u64)n);
	puts(b);
	puts("\n");
}

/* A frame of `kind` that must not come now: "a Config frame before Hello". */
static void frame_error(u8 kind, const char *why)
{
	f_begin(K_ERROR);
	f_str("a ");
	f_str(kind_names[kind]);
	f_str(why);
	f_end();
	closing = 1;
	puts("runv-guest: channel: closing the host connection: a ");
	puts(kind_names[kind]);
	puts(why);
	puts("\n");
}

static int json_space(u8 c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

/* Where the value of the first `"key":` in a JSON text starts, or n. */
static u32 json_value(const u8 *p, u32 n, const char *key)
{
	u32 k = slen(key);
	for (u32 i = 0; i + k + 2 <= n; i++) {
		if (p[i] != '"' || p[i + k + 1] != '"')
			continue;
		int same = 1;
		for (u32 x = 0; x < k; x++)
			same &= p[i + 1 + x] == (u8)key[x];
		if (!same)
			continue;
		u32 j = i + k + 2;
		while (j < n && json_space(p[j]))
			j++;
		if (j >= n || p[j] != ':')
			continue;
		for (j++; j < n && json_space(p[j]); j++)
			;
		return j;
	}
	return n;
}

/* The unsigned number of `"key":`, or -1. */
static long json_uint(const u8 *p, u32 n, const char *key)
{
	long v = -1;
	for (u32 j = json_value(p, n, key); j < n && p[j] >= '0' && p[j] <= '9' && v < 100000000000L; j++)
		v = (v < 0 ? 0 : v * 10) + (p[j] - '0');
	return v;
}

/*
 * The string of `"key":` (or the first string of its array) into out, at
 * most max bytes; returns its length, or -1. The escapes \" \\ \/ are
 * resolved; any other escape becomes '?'.
 */
static int json_str(const u8 *p, u32 n, const char *key, char *out, int max)
{
	u32 j = json_value(p, n, key);
	if (j < n && p[j] == '[')
		for (j++; j < n && json_space(p[j]); j++)
			;
	if (j >= n || p[j] != '"')
		return -1;
	int len = 0;
	for (j++; j < n && p[j] != '"'; j++) {
		u8 c = p[j];
		if (c == '\\' && j + 1 < n) {
			c = p[++j];
			if (c == 'u')
				j += 4;
			if (c != '"' && c != '\\' && c != '/')
				c = '?';
		}
		if (len < max)
			out[len++] = (char)c;
	}
	return j < n ? len : -1;
}

/* Powers off, saying how the guest was woken while it waited. */
static void off(void)
{
	puts("runv-guest: channel wake-ups: device interrupts=");
	putdec(irq_count());
	puts(" timer ticks=");
	putdec(irq_ticks());
	puts("\n");
	poweroff();
}

static void finish(int code, int signal, const char *start_error)
{
	ex.code = code;
	ex.signal = signal;
	ex.start_error = start_error;
	phase = EXITED;
	exited_at = irq_ticks();
	send_exited();
	puts("runv-guest: container exited ");
	if (start_error) {
		puts("start error: ");
		puts(start_error);
	} else if (signal) {
		puts("signal=");
		putdec((u64)signal);
	} else {
		puts("code=");
		if (code < 0) {
			putc('-');
			putdec((u64)-(long)code);
		} else {
			putdec((u64)code);
		}
	}
	puts("\n");
}

static void start(const u8 *config, u32 config_len)
{
	static char hostname[64], argv0[64];
	int hlen = json_str(config, config_len, "hostname", hostname, sizeof(hostname));
	int alen = json_str(config, config_len, "argv", argv0, sizeof(argv0));
	phase = RUNNING;
	puts("runv-guest: container started (config of ");
	putdec(config_len);
	puts(" bytes)\n");
	f_begin(K_STARTED);
	f_str("{\"pid\":1,\"startedAtNanos\":0}");
	f_end();
	f_begin(K_STDOUT);
	f_str("runv-test-guest stdout: ");
	f_bytes(word, (u32)word_len);
	f_str(" (config of ");
	f_int(config_len);
	f_str(" bytes, hostname ");
	f_bytes(hostname, hlen > 0 ? (u32)hlen : 0);
	f_str(", argv[0] ");
	f_bytes(argv0, alen > 0 ? (u32)alen : 0);
	f_str(")\n");
	f_end();
	f_begin(K_STDERR);
	f_str("runv-test-guest stderr: ");
	f_bytes(word, (u32)word_len);
	f_str("\n");
	f_end();
	if (bad) {
		static const u8 too_long[] = { 0, 0x10, 0, 0, K_STDOUT };
		static const u8 unknown_kind[] = { 0, 0, 0, 1, 99 };
		puts("runv-guest: container sends a broken frame: ");
		for (int i = 0; i < bad_len; i++)
			putc(bad[i]);
		puts("\n");
		if (str_eq(bad, bad_len, "length")) {
			f_begin(K_STDOUT);
			out_tail = frame_at; /* raw bytes, no frame around them */
			f_bytes(too_long, sizeof(too_long));
		} else if (str_eq(bad, bad_len, "kind")) {
			f_begin(K_STDOUT);
			out_tail = frame_at;
			f_bytes(unknown_kind, sizeof(unknown_kind));
		} else {
			f_begin(K_EXITED);
			f_str("{\"code\":");
			f_end();
		}
		return; /* and keeps running */
	}
	if (!forever && !flood_left)
		finish(want_code, want_signal, 0);
}

/* The flood's pattern repeats every 832 bytes (lcm of 64 and 26); the table
 * holds a chunk's worth more, so any chunk is one copy from it. */
#define FLOOD_PERIOD 832u
#define FLOOD_CHUNK 4096u
static u8 flood_pat[FLOOD_PERIOD + FLOOD_CHUNK];

/* Queues flood output while the outbox has room; exits when it is all out. */
static void flood(void)
{
	if (bad)
		return;
	if (flood_left && flood_pat[0] != 'a')
		for (u32 i = 0; i < sizeof(flood_pat); i++)
			flood_pat[i] = i % 64 == 63 ? '\n' : (u8)('a' + i % 26);
	while (phase == RUNNING && flood_left && vs_connected() && !closing &&
	       out_tail - out_head + 5 + FLOOD_CHUNK <= sizeof(out)) {
		u32 n = flood_left < FLOOD_CHUNK ? (u32)flood_left : FLOOD_CHUNK;
		f_begin(K_STDOUT);
		f_bytes(flood_pat + flood_at % FLOOD_PERIOD, n);
		f_end();
		flood_at += n;
		flood_left -= n;
		flush();
	}
	if (phase == RUNNING && flood_at && !flood_left && !forever) {
		puts("runv-guest: container flooded ");
		putdec(flood_at);
		puts(" bytes\n");
		finish(want_code, want_signal, 0);
	}
}

static void stop(const char *why)
{
	puts("runv-guest: container stop: ");
	puts(why);
	puts("\n");
	if (phase == WAITING)
		finish(0, 0, "stopped before the container started");
	else if (phase == RUNNING)
		finish(0, 15, 0);
}

static void on_frame(u8 kind, const u8 *p, u32 n)
{
	if (kind == 0 || kind > K_ERROR) {
		protocol_error("a frame of unknown kind ", kind, "");
		return;
	}
	if (!greeted && kind != K_HELLO) {
		frame_error(kind, " frame before Hello");
		return;
	}
	switch (kind) {
	case K_HELLO: {
		long v = json_uint(p, n, "version");
		if (v < 0) {
			protocol_error("a Hello without a protocol version", -1, "");
			return;
		}
		if (v != 1) {
			protocol_error("the peer speaks guest protocol version ", v, "; this side speaks 1");
			return;
		}
		greeted = 1;
		return;
	}
	case K_CONFIG:
		if (phase != WAITING)
			return; /* ignored once the container started */
		{
			long t = json_uint(p, n, "exitReportTimeoutSeconds");
			if (t >= 0)
				exit_report_s = t > 86400 ? 86400 : (u32)t;
		}
		start(p, n);
		return;
	case K_STOP:
		stop("Stop from the host");
		return;
	case K_EXIT_ACK:
		if (phase == EXITED) {
			puts("runv-guest: container exit acknowledged\n");
			off();
		}
		return;
	case K_ERROR:
		puts("runv-guest: channel: the host says: ");
		for (u32 i = 0; i < n && i < 200; i++)
			putc(p[i] >= 32 && p[i] < 127 ? (char)p[i] : '?');
		puts("\n");
		return;
	default:
		frame_error(kind, " frame, which this side of the channel never receives");
		return;
	}
}

static u32 be32(const u8 *b) { return (u32)b[0] << 24 | (u32)b[1] << 16 | (u32)b[2] << 8 | b[3]; }

/* Feeds received bytes to the frame reader. */
static void feed(const u8 *p, u32 n)
{
	while (n && !closing && vs_connected()) {
		u32 want = in_len < 4 ? 4 - in_len : 4 + be32(in) - in_len;
		u32 take = n < want ? n : want;
		memcpy(in + in_len, p, take);
		in_len += take;
		p += take;
		n -= take;
		if (in_len == 4) {
			u32 len = be32(in);
			if (len == 0 || len > MAX_FRAME) {
				protocol_error("a frame of ", (long)len, " bytes; frames are 1 to 65536 bytes");
				return;
			}
		}
		if (in_len > 4 && in_len == 4 + be32(in)) {
			in_len = 0;
			on_frame(in[4], in + 5, be32(in) - 1);
		}
	}
}

/* A decimal of at most 9 digits (an optional '-' first). */
static int parse_int(const char *v, int len)
{
	int neg = len > 0 && v[0] == '-', n = 0;
	for (int i = neg; i < len && i < neg + 9 && v[i] >= '0' && v[i] <= '9'; i++)
		n = n * 10 + (v[i] - '0');
	return neg ? -n : n;
}

static void parse_args(void)
{
	int len;
	const char *v;
	if ((v = cmdline_get("exit", &len)))
		want_code = parse_int(v, len);
	if ((v = cmdline_get("signal", &len)))
		want_signal = parse_int(v, len);
	if ((v = cmdline_get("out", &len)) && len > 0 && len <= 64) {
		word = v;
		word_len = len;
	}
	if ((v = cmdline_get("run", &len)) && str_eq(v, len, "forever"))
		forever = 1;
	if ((v = cmdline_get("flood", &len)))
		for (int i = 0; i < len && i < 12 && v[i] >= '0' && v[i] <= '9'; i++)
			flood_left = flood_left * 10 + (u64)(v[i] - '0');
	if ((v = cmdline_get("bad", &len)) && len > 0) {
		bad = v;
		bad_len = len;
	}
}

void container_main(const char *cmdline)
{
	int dlen;
	parse_args();
	const char *disks = cmdline_get("disks", &dlen);
	if (disks && str_eq(disks, dlen, "check"))
		virtio_blk_tests(cmdline);
	irq_setup();
	irq_tick_start(TICK_MS);
	if (!vs_listen(cmdline, CHAN_PORT))
		fail("test=container needs a virtio-vsock device");
	puts("runv-guest: container waiting for its config\n");
	int button = 0;
	for (;;) {
		struct vs_event ev;
		while (vs_next(&ev)) {
			if (ev.kind == VS_CONNECTED) {
				puts("runv-guest: channel: host connected from port ");
				putdec(ev.peer_port);
				puts("\n");
				in_len = 0;
				greeted = closing = 0;
				out_head = out_tail = 0; /* what the old connection missed */
				send_hello();
				if (phase == EXITED)
					send_exited();
			} else if (ev.kind == VS_CLOSED) {
				puts("runv-guest: channel: host disconnected\n");
				out_head = out_tail = 0;
				in_len = 0;
				greeted = closing = 0;
			} else if (ev.kind == VS_DATA && !closing) {
				feed(ev.data, ev.len);
			}
			flush();
		}
		flush();
		flood();
		if (!button && power_button()) {
			button = 1;
			stop("power button");
			flush();
		}
		if (phase == EXITED && (u64)(irq_ticks() - exited_at) * TICK_MS >= (u64)exit_report_s * 1000) {
			puts("runv-guest: no host acknowledged the exit within ");
			putdec(exit_report_s);
			puts(" s\n");
			off();
		}
		irq_sleep(vs_pending);
	}
}
