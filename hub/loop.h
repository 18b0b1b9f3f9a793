/*
 * loop.h - the process's one event loop, owned by lws. The choice of backend
 * lives here and nowhere else: lws on its libev plugin (epoll), because lws's
 * default poll() backend collapsed with 10k idle connections
 * (docs/pitfalls.md).
 * hiredis, timers and signals all run on this loop.
 */
#ifndef HUB_LOOP_H
#define HUB_LOOP_H

#include <stddef.h>

struct hub;

/* Creates the lws context and the one vhost (TLS when configured) with the
 * hub's protocols; installs SIGTERM/SIGINT/SIGHUP handlers that only set a
 * flag and wake the loop. Returns 0 or -1 with err filled. */
int hub_loop_create(struct hub *hub, char *err, size_t errlen);

/* Runs until hub_loop_stop() has been called from inside the loop. */
void hub_loop_run(struct hub *hub);

/* Ends the loop; call from a timer callback, never from a hiredis callback. */
void hub_loop_stop(struct hub *hub);

/* WebSocket liveness (hub/keepalive.h) for a connection's entry e (in
 * its per-session data, zeroed by lws): start at ESTABLISHED, pong at each
 * PONG, stop at CLOSED (a no-op when not started). A connection silent past
 * ping-interval-s is asked for writeable, and hub_keepalive_writeable(),
 * called first in its SERVER_WRITEABLE, writes the PING: it returns 1 when
 * it wrote one (return 0 from the callback; the next writeable is asked
 * for), -1 when the write failed (close), 0 when none was owed. No PONG
 * ping-timeout-s after the last: the connection is closed. */
struct hub_ka_entry;
struct lws;
void hub_keepalive_start(struct hub *hub, struct hub_ka_entry *e, struct lws *wsi);
void hub_keepalive_pong(struct hub *hub, struct hub_ka_entry *e);
void hub_keepalive_stop(struct hub *hub, struct hub_ka_entry *e);
int hub_keepalive_writeable(struct hub *hub, struct hub_ka_entry *e);

/* Finishes destroying the context after hub_loop_run() returned. */
void hub_loop_destroy(struct hub *hub);

#endif
