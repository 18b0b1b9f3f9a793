/*
 * embedded_redis.h - a private redis-server for `--redis embedded`: started on
 * a free loopback port in a temporary directory before the loop runs, stopped
 * (and its directory removed) on exit; it dies with the hub (PDEATHSIG).
 */
#ifndef HUB_EMBEDDED_REDIS_H
#define HUB_EMBEDDED_REDIS_H

#include <stddef.h>

struct hub_embedded_redis;

/* Starts `binary` and waits (blocking, start-up only, at most 10 s) until it
 * answers PING. Returns NULL with err filled. *port_out gets its port. */
struct hub_embedded_redis *hub_embedded_redis_start(const char *binary,
						    int *port_out,
						    char *err, size_t errlen);

/* SIGTERM, wait, remove the directory. NULL-safe. */
void hub_embedded_redis_stop(struct hub_embedded_redis *e);

#endif
