/*
 * durability.h - what ack-durability asks of Redis (docs/streams.md
 * "Durability"). In fsync mode a gate on the Redis bus checks, on every
 * (re)connect and then every second, that Redis runs `appendonly yes` and
 * `appendfsync always` (CONFIG GET): until it does the connection does not
 * count as up (not ready, telemetry answered `unavailable`), and a hub that
 * never saw a Redis that does exits with status 1 (refuses to start). The
 * replicated mode's WAIT is the bus's (hub_redis_command_durable).
 */
#ifndef HUB_DURABILITY_H
#define HUB_DURABILITY_H

struct hub;

/* Registers the checks the configured mode needs; before hub_redis_start().
 * Logs the mode. */
void hub_durability_init(struct hub *hub);
void hub_durability_free(struct hub *hub);

#endif
