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

/* Finishes destroying the context after hub_loop_run() returned. */
void hub_loop_destroy(struct hub *hub);

#endif
