/*
 * embedded_redis.h - the private redis-server of `--redis embedded`, durable:
 * it keeps its data (an append-only file) in data-dir, which outlives the
 * process and is reused by the next start.
 *
 * The data directory holds, besides Redis's own files (appendonlydir/,
 * redis.log):
 *   iot-hub.lock  flock()ed by the running hub (its pid inside): a second
 *                 hub on the same directory refuses to start;
 *   redis.pid     the pid of the redis-server child, so that one left behind
 *                 by a hub killed with SIGKILL (it gets SIGTERM through
 *                 PR_SET_PDEATHSIG, but may be stopped, slow, or older) is
 *                 found and stopped before a new one starts.
 * Start-up and shutdown only: everything here blocks.
 */
#ifndef HUB_EMBEDDED_REDIS_H
#define HUB_EMBEDDED_REDIS_H

#include <stdbool.h>
#include <stddef.h>

struct hub_embedded_redis;

/* Creates data_dir if needed (0700), locks it, stops a redis-server left
 * running in it by an earlier hub (verified through /proc: its cwd is the
 * data directory and it is a redis-server; SIGTERM + SIGCONT, then SIGKILL
 * after 10 s), and starts `binary` there on a free loopback port with
 * appendonly yes and appendfsync `always` (fsync_always) or `everysec`.
 * Waits until it answers PING (as long as it is loading its data set, else
 * at most 10 s). Returns NULL with one line in err (the directory is in use
 * by another hub, cannot be created, redis-server did not start).
 * *port_out gets its port. */
struct hub_embedded_redis *hub_embedded_redis_start(const char *binary, const char *data_dir,
						    bool fsync_always, int *port_out,
						    char *err, size_t errlen);

/* The data directory, absolute (lives as long as e). */
const char *hub_embedded_redis_dir(const struct hub_embedded_redis *e);

/* SIGTERM (Redis flushes and fsyncs its append-only file), wait up to 10 s,
 * then SIGKILL; removes redis.pid and releases the lock. Keeps the data.
 * NULL-safe. */
void hub_embedded_redis_stop(struct hub_embedded_redis *e);

#endif
