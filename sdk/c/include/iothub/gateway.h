/*
 * iothub/gateway.h - libiothub-gw, the client side of the iot-hub gateway
 * protocol (docs/protocol.md) for embedded Linux gateways, on libwebsockets.
 *
 * One struct iothub_gw is one gateway identity: one WebSocket connection to
 * the hub (re-made with back-off and jitter), its announced devices (announced
 * again after every reconnect), an outbox of readings kept in an append-only
 * on-disk spool (docs/sdk.md, "Delivery guarantees") and its command handlers.
 * There is no global state: several gateways may live in one process.
 *
 * Threads: iothub_gw_service()/iothub_gw_run() drive the gateway from one
 * thread (the service thread); every callback runs there. iothub_gw_send(),
 * iothub_gw_announce(), iothub_gw_cmd_report() (and its wrappers),
 * iothub_gw_stop() and iothub_gw_stats() may be called from any thread,
 * including from callbacks. Configuration calls (iothub_gw_on_command(),
 * iothub_gw_on_cancel()) come before the first service call.
 *
 * Errors follow the project's convention (docs/hacking.md "Errors"): a
 * function returns IOTHUB_GW_OK (0) or a positive enum iothub_gw_err, and
 * writes a NUL-terminated message into (err, errlen) only when it fails;
 * pass NULL, 0 when the words are not wanted. 256 bytes hold every message.
 */
#ifndef IOTHUB_GATEWAY_H
#define IOTHUB_GATEWAY_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct iothub_gw;

enum iothub_gw_err {
	IOTHUB_GW_OK = 0,
	IOTHUB_GW_EINVAL,       /* a bad argument: device id, JSON, option */
	IOTHUB_GW_ETOOBIG,      /* one reading larger than a frame may be */
	IOTHUB_GW_ESPOOL_FULL,  /* the spool is at max_spool_bytes: not accepted */
	IOTHUB_GW_EIO,          /* the spool could not be read or written */
	IOTHUB_GW_ELWS,         /* libwebsockets refused (context, TLS files) */
	IOTHUB_GW_ESTOPPED,     /* iothub_gw_stop() was called */
	IOTHUB_GW_ENOENT,       /* no such command id (cmd_report) */
	IOTHUB_GW_ERR__COUNT
};

/* A static text per error code ("spool full"). */
const char *iothub_gw_strerror(enum iothub_gw_err e);

enum iothub_gw_fsync {
	IOTHUB_GW_FSYNC_NONE = 0,  /* never: survives a crash of the process */
	IOTHUB_GW_FSYNC_BATCH,     /* before a frame is sent, and every fsync_ms */
	IOTHUB_GW_FSYNC_ALWAYS,    /* every accepted reading before send() returns */
};

/* Connection states reported to on_state. */
enum iothub_gw_state {
	IOTHUB_GW_CONNECTING = 0,
	IOTHUB_GW_ONLINE,          /* upgraded and devices announced */
	IOTHUB_GW_DISCONNECTED,    /* a reconnect follows after the back-off */
};

struct iothub_gw_reject {
	uint64_t seq;              /* the frame */
	int index;                 /* position of the reading in the frame */
	const char *device;        /* may be NULL */
	const char *code;          /* invalid, unknown_device, clock_skew, ... */
	const char *detail_json;   /* the whole reject entry as JSON */
	const char *reading_json;  /* the reading as spooled */
};

struct iothub_gw_command {
	const char *id;
	const char *device;
	const char *name;
	const char *params_json;   /* "null" when absent */
	int attempt;
	int64_t expires_at;        /* ms, 0 when absent */
};

/* The token for the next upgrade: write a NUL-terminated JWT into buf (cap
 * bytes), return 0; -1 to keep the last one. Called before every connect. */
typedef int (*iothub_gw_token_cb)(struct iothub_gw *gw, char *buf, size_t cap, void *user);
typedef void (*iothub_gw_reject_cb)(struct iothub_gw *gw, const struct iothub_gw_reject *r,
				    void *user);
/* code: the close code or HTTP status (4001 takeover, 4029, 4401, 401, ...), 0
 * when none; reason: words for it, "" when none. */
typedef void (*iothub_gw_state_cb)(struct iothub_gw *gw, enum iothub_gw_state s, int code,
				   const char *reason, void *user);
/* A command, delivered once per id (a redelivery of an id already handled
 * is answered with its last status, not delivered again). "received" has
 * been queued already; report the rest with iothub_gw_cmd_report(), now or
 * later, from any thread. The struct dies when the callback returns. */
typedef void (*iothub_gw_command_cb)(struct iothub_gw *gw, const struct iothub_gw_command *c,
				     void *user);
typedef void (*iothub_gw_cancel_cb)(struct iothub_gw *gw, const char *id, const char *device,
				    void *user);

/* Device signatures (docs/provenance.md "Device signatures"): signs one
 * reading's canonical bytes msg[0..len) (iothub_gw_reading_message) with the
 * device's Ed25519 key, writing the 64-byte signature to sig. Returns 0, or
 * non-zero to refuse the reading (send() then answers IOTHUB_GW_EINVAL).
 * Runs on the thread that called iothub_gw_send(). */
typedef int (*iothub_gw_sign_cb)(struct iothub_gw *gw, const char *device,
				 const unsigned char *msg, size_t len, unsigned char sig[64],
				 void *user);

struct iothub_gw_opts {
	const char *url;            /* ws://host:port/v1/gateway or wss://... */
	const char *token;          /* the JWT, or NULL with token_cb */
	iothub_gw_token_cb token_cb;
	void *token_user;
	const char *ca_file;        /* CA for the hub's certificate (NULL: system) */
	const char *cert_file;      /* client certificate and key: mTLS */
	const char *key_file;
	int tls_insecure;           /* skip certificate verification (tests only) */

	const char *spool_dir;      /* required; created when missing */
	size_t max_spool_bytes;     /* 0: 64 MiB */
	size_t segment_bytes;       /* 0: max_spool_bytes / 16, at least 64 KiB */
	enum iothub_gw_fsync fsync; /* default NONE */
	int fsync_ms;               /* BATCH: at most this long unsynced (0: 200) */

	int max_readings;           /* per frame (0: 500; at most 1000) */
	int max_delay_ms;           /* a reading waits at most this for a frame (0: 50) */
	size_t max_frame_bytes;     /* 0: 60000 (the hub's max-frame-bytes is 65536) */
	int max_inflight;           /* frames sent and not acked (0: 16) */
	int ack_timeout_ms;         /* a frame or announce unanswered this long
	                             * gives the connection up: it is closed and
	                             * made again after the back-off, and unacked
	                             * frames go again with their seq
	                             * (0: 10000; < 0: never) */

	int backoff_min_ms;         /* reconnect back-off (0: 500) */
	int backoff_max_ms;         /* (0: 30000); each delay has +-50 % jitter */

	iothub_gw_reject_cb on_reject;
	iothub_gw_state_cb on_state;
	void *user;                 /* for on_reject, on_state */

	/* NULL: readings go unsigned. Set: every reading is signed (its type
	 * must declare "signed_readings"); data is sent compact and a reading
	 * without ts gets the gateway's clock (the signature covers ts). */
	iothub_gw_sign_cb sign_cb;
	void *sign_user;
};

/* The bytes a device signs for one reading: "iot-hub.reading.v1" NUL, then
 * device, ts (decimal) and data (compact JSON), each as a 4-byte big-endian
 * length and its bytes. Writes at most cap bytes to out; returns the length
 * needed. */
size_t iothub_gw_reading_message(const char *device, int64_t ts, const char *data,
				 size_t data_len, unsigned char *out, size_t cap);

/* Opens the spool (replaying what it holds) and creates the lws context; no
 * connection is made before the first service call. Returns the gateway, or
 * NULL with a message in err. Free with iothub_gw_free(). */
struct iothub_gw *iothub_gw_new(const struct iothub_gw_opts *o, char *err, size_t errlen);

/* Closes the connection and frees everything; what is unacked stays in the
 * spool for the next iothub_gw_new() on the same spool_dir. Not from a
 * callback, and with no other thread still calling into gw. NULL-safe. */
void iothub_gw_free(struct iothub_gw *gw);

/* Adds (or updates) a device in the announcement: announced now when online,
 * and after every reconnect. labels_json: an object of strings, or NULL.
 * Any thread. Returns 0 or IOTHUB_GW_EINVAL. */
int iothub_gw_announce(struct iothub_gw *gw, const char *device, const char *device_type,
		       const char *labels_json, char *err, size_t errlen);

/* Accepts one reading: data_json an object, ts ms since the epoch (< 0: let
 * the hub stamp it). Never waits for the network: the reading is appended
 * to the spool (fsynced first with IOTHUB_GW_FSYNC_ALWAYS) before it returns,
 * and from then on it is delivered (docs/sdk.md). IOTHUB_GW_ESPOOL_FULL when
 * the spool is at its bound (nothing was written; try again once acks have
 * compacted it). Any thread. */
int iothub_gw_send(struct iothub_gw *gw, const char *device, int64_t ts, const char *data_json,
		   char *err, size_t errlen);

/* Handlers per command name (name NULL: every name without its own). A
 * command without a handler is answered "rejected" ("unsupported command"). */
void iothub_gw_on_command(struct iothub_gw *gw, const char *name, iothub_gw_command_cb cb,
			  void *user);
void iothub_gw_on_cancel(struct iothub_gw *gw, iothub_gw_cancel_cb cb, void *user);

/* Reports a command's status: "received", "in_progress" (progress 0..100 or
 * -1, message or NULL), "succeeded" (result_json or NULL), "failed" or
 * "rejected" (message: the error). Sent when online (queued meanwhile, and
 * sent again after rate_limited). Any thread. IOTHUB_GW_ENOENT for an id the
 * gateway was never given; IOTHUB_GW_EINVAL for a bad status or result. */
int iothub_gw_cmd_report(struct iothub_gw *gw, const char *id, const char *status, int progress,
			 const char *message, const char *result_json, char *err, size_t errlen);
int iothub_gw_cmd_in_progress(struct iothub_gw *gw, const char *id, int progress,
			      const char *message);
int iothub_gw_cmd_succeeded(struct iothub_gw *gw, const char *id, const char *result_json);
int iothub_gw_cmd_failed(struct iothub_gw *gw, const char *id, const char *error);
int iothub_gw_cmd_rejected(struct iothub_gw *gw, const char *id, const char *error);

/* Services the connection, timers and the outbox: returns after the next
 * batch of events or timeout_ms (0: do what is ready, never wait). Returns
 * 0, or IOTHUB_GW_ESTOPPED after iothub_gw_stop(). Service thread only. */
int iothub_gw_service(struct iothub_gw *gw, int timeout_ms);

/* A foreign event loop (poll, epoll, libuv, ...) drives the gateway without
 * a thread of its own through one descriptor:
 *
 *	short ev;
 *	struct pollfd p = { .fd = iothub_gw_fd(gw, &ev), .events = ev };
 *	for (;;) {
 *		poll(&p, 1, iothub_gw_next_timeout(gw));   (with the loop's own fds)
 *		iothub_gw_service(gw, 0);                  (ready or timed out)
 *	}
 *
 * iothub_gw_fd() returns a descriptor that stays the same for the life of
 * gw (an epoll set of the library's sockets and its wake pipe) and sets
 * *events (may be NULL) to the poll() events to wait for (POLLIN). It is
 * level-triggered: readable while the library has something to do; sends
 * from other threads make it readable too. Do not read it or close it.
 * iothub_gw_next_timeout() is the wait in ms (0..1000) until
 * iothub_gw_service(gw, 0) is due even when the fd stays quiet: 0 before the
 * first service call, when a timer is due, or when lws holds buffered data.
 * Both from the service thread (the loop's thread) only. */
int iothub_gw_fd(struct iothub_gw *gw, short *events);
int iothub_gw_next_timeout(struct iothub_gw *gw);

/* Services until iothub_gw_stop(). Service thread only. */
void iothub_gw_run(struct iothub_gw *gw);

/* Makes iothub_gw_run() return and iothub_gw_service() return
 * IOTHUB_GW_ESTOPPED. Any thread (not a signal handler). */
void iothub_gw_stop(struct iothub_gw *gw);

/* Waits (servicing, service thread only) until every accepted reading is
 * acked or timeout_ms passes. Returns 0 when drained, -1 on timeout. */
int iothub_gw_flush(struct iothub_gw *gw, int timeout_ms);

struct iothub_gw_stats {
	uint64_t accepted;         /* readings send() accepted (this process) */
	uint64_t acked;            /* readings in frames the hub acked */
	uint64_t duplicates;       /* frames acked "duplicate":true */
	uint64_t rejected;         /* readings refused (on_reject) */
	uint64_t rate_limited;     /* readings refused rate_limited and resent */
	uint64_t unavailable;      /* frames answered unavailable and resent */
	uint64_t frames_sent;
	uint64_t reconnects;
	uint64_t pending;          /* readings in the spool not yet acked */
	uint64_t spool_bytes;      /* the spool's size on disk */
	uint64_t next_seq;
	int online;
	uint64_t ack_timeouts;     /* connections given up for a missing answer */
	uint64_t frames_acked;     /* frames the hub acked (duplicates too) */
};
void iothub_gw_stats(struct iothub_gw *gw, struct iothub_gw_stats *s);

#ifdef __cplusplus
}
#endif
#endif
