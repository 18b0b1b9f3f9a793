/*
 * client.h - a small client of the hub's wire protocols on libwebsockets 4.1.6:
 * WebSocket connections (ws/wss, a subprotocol, an Authorization header,
 * text or binary messages) and HTTP requests (GET/POST with a body, TLS,
 * chunked answers streamed to a callback), all on one lws context that the
 * caller drives. hubctl runs it synchronously (hc_wait() until the answer
 * is in); gw-sim and dash-sub run it as an event loop (hc_run()) with
 * thousands of connections. It hides the lws 4.1.6 quirks the tools met:
 * the libev timer that fires late, the client parser that must not see a
 * non-zero return from RECEIVE, the refused upgrade whose status and body
 * lws drops, the idle-timer cost per connection.
 *
 * Threads: one. Every function may be called from any callback of this
 * layer (and from lws_sul timers on hc_lws()), unless it says otherwise;
 * none may be called from a signal handler.
 * Ownership: the layer owns every struct hc_conn. A connection lives from
 * hc_connect() until its on_close returns (then it is freed); after
 * hc_abort() no callback of it runs again and it may be gone at once.
 * What hc_conn_opts points to (URL, strings, body) is borrowed: it must stay
 * valid until on_close (or hc_abort()). Data handed to a callback dies when
 * the callback returns.
 */
#ifndef TOOLS_CLIENT_H
#define TOOLS_CLIENT_H

#include <libwebsockets.h>

#include <stddef.h>
#include <stdint.h>

struct hc_ctx;
struct hc_conn;

/* ------------------------------------------------------------------------ */
/* URLs                                                                       */

struct hc_url {
	int tls;          /* wss:// or https:// */
	char *host;       /* address to connect to, without [] */
	int port;         /* given, or the scheme's 80/443 */
	char *path;       /* from the first '/' up to '#', "/" when none */
	char *host_hdr;   /* Host: value ("[v6]" literal; ":port" unless default) */
};

#define HC_WS   1u    /* schemes hc_url_parse() accepts: ws://, wss:// */
#define HC_HTTP 2u    /* http://, https:// */

/* Parses url for the schemes in the mask. Returns 0, or -1 with one line in
 * err ("no host in '...'"). Free with hc_url_free() (also after a failure). */
int hc_url_parse(struct hc_url *u, const char *url, unsigned schemes,
		 char *err, size_t errlen);
void hc_url_free(struct hc_url *u);

/* ------------------------------------------------------------------------ */
/* the context                                                                */

struct hc_ctx_opts {
	int libev;               /* the libev backend (else poll) */
	int tls;                 /* some connection will use TLS */
	const char *ca_file;     /* CA to verify servers (NULL: system store) */
	const char *cert_file;   /* client certificate and key (mTLS) */
	const char *key_file;
	size_t rx_buffer;        /* lws receive buffer per connection (0: 1024) */
	int signals;             /* handle SIGINT/SIGTERM: count them */
	/* then called from the loop (never from the handler) with the number
	 * of signals so far; may be NULL */
	void (*on_signal)(struct hc_ctx *x, int count);
};

/* Creates the lws context (no listener). Returns NULL with a line in err
 * (missing libev plugin, unreadable certificate). Start-up code. */
struct hc_ctx *hc_ctx_new(const struct hc_ctx_opts *o, char *err, size_t errlen);

/* Destroys the context: connections still open are closed and their
 * on_close runs inside this call. Not from a callback. NULL-safe. */
void hc_ctx_free(struct hc_ctx *x);

/* The lws context, for timers (lws_sul_schedule(hc_lws(x), 0, ...)). */
struct lws_context *hc_lws(struct hc_ctx *x);

/* A reusable scratch buffer of n bytes with LWS_PRE headroom before it,
 * shared by all connections: build a message in it and hc_write() it
 * without a copy. Valid until the next call. Aborts on OOM. */
unsigned char *hc_txbuf(struct hc_ctx *x, size_t n);

/* Event loop: services until hc_stop(), then destroys the context (the
 * connections' on_close run before it returns). Not from a callback. */
void hc_run(struct hc_ctx *x);

/* Ends hc_run(): closes everything when the current callback returns.
 * Cancel your own timers first: none may fire after this. */
void hc_stop(struct hc_ctx *x);

enum { HC_DONE = 0, HC_TIMEOUT = -1, HC_INTR = -2, HC_FAIL = -3 };

/*
 * Synchronous use: services until *done is non-zero (HC_DONE), the
 * monotonic time deadline_us passes (HC_TIMEOUT; 0: none), a SIGINT or
 * SIGTERM has come (HC_INTR: once one came, every wait returns so; needs
 * signals), or lws fails (HC_FAIL). Not from a callback.
 */
int hc_wait(struct hc_ctx *x, const int *done, int64_t deadline_us);

/* ------------------------------------------------------------------------ */
/* connections                                                                */

/* How a connection ended (on_close). Strings die when on_close returns. */
struct hc_end {
	const char *error;   /* why it failed (lws's words), NULL: it closed */
	int opened;          /* on_open was called */
	int status;          /* HTTP status of the answer (or the refused
			      * upgrade), 0 when none came */
	int close_code;      /* WebSocket close code the peer sent, 0 none */
	const char *reason;  /* the peer's close reason, "" none */
	const char *body;    /* a refused upgrade's body (<= 64 KiB), or NULL */
	size_t body_len;
};

struct hc_cbs {
	/* WebSocket: established. HTTP: the answer's head is in. */
	void (*on_open)(struct hc_conn *c, void *user);
	/* WebSocket: one whole message (or, with raw, bytes as they come);
	 * msg NULL: a message over max_message was dropped (the rest of it is
	 * skipped; close the connection or not). HTTP: a piece of the body,
	 * chunked framing removed. */
	void (*on_message)(struct hc_conn *c, const char *msg, size_t len, void *user);
	/* WebSocket: the connection may write one message now (hc_write()). */
	void (*on_writeable)(struct hc_conn *c, void *user);
	/* Exactly once per connection that hc_connect() returned, last. */
	void (*on_close)(struct hc_conn *c, const struct hc_end *end, void *user);
};

struct hc_conn_opts {
	const struct hc_url *url;
	const char *path;         /* NULL: url->path; else appended to it */
	const char *method;       /* NULL: a WebSocket upgrade; "GET", "POST" */
	const char *subprotocol;  /* WebSocket subprotocol */
	const char *auth;         /* Authorization value ("Bearer ..."), or NULL */
	const char *header_name;  /* one more request header ("idempotency-key:") */
	const char *header_value;
	const char *body;         /* HTTP request body (application/json) */
	size_t body_len;
	const char *iface;        /* local address to bind to, or NULL */
	int insecure;             /* accept any server certificate and name */
	size_t max_message;       /* WebSocket messages assembled up to this
				   * (0: 1 MiB) */
	int raw;                  /* WebSocket: no assembly (a byte stream) */
	const struct hc_cbs *cb;
	void *user;
};

/* Starts a connection. Returns it, or NULL when lws refused at once (then
 * no callback ever runs for it). */
struct hc_conn *hc_connect(struct hc_ctx *x, const struct hc_conn_opts *o);

/* Asks for on_writeable (WebSocket, once open; ignored before). */
void hc_want_write(struct hc_conn *c);

/* From on_writeable only: sends one message (data may be hc_txbuf()).
 * Returns 0, or -1 when lws took less (the connection then closes). */
int hc_write(struct hc_conn *c, const void *data, size_t len, int binary);

/* Queues a copy of a text message, sent before on_writeable is offered
 * (at most 64 queued; -1 when full or closing). Any time after connect. */
int hc_send(struct hc_conn *c, const char *text, size_t len);

/* Closes: an open WebSocket with this close code and reason from its next
 * writeable turn (nothing it receives meanwhile is delivered); anything
 * else at once. on_close follows. Idempotent. */
void hc_close(struct hc_conn *c, int code, const char *reason);

/* Forgets c: no callback of it runs again; lws closes it. */
void hc_abort(struct hc_conn *c);

/* The number of SIGINT/SIGTERM so far (0 without signals). */
int hc_signal_count(void);

#endif
