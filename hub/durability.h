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

/* What Redis itself does to keep data across its restarts, as last checked
 * (INFO persistence: aof_enabled; else CONFIG GET save) when the command
 * connection came up and every minute: exported as
 * iot_hub_redis_persistence{mode} and logged (a warning for none and rdb). */
enum hub_persistence {
	HUB_PERSIST_UNCHECKED,  /* no answer yet */
	HUB_PERSIST_UNKNOWN,    /* no AOF, and CONFIG GET save was refused */
	HUB_PERSIST_NONE,       /* appendonly no and no save points */
	HUB_PERSIST_RDB,        /* save points only */
	HUB_PERSIST_AOF,        /* appendonly yes */
	HUB__PERSIST_COUNT
};

enum hub_persistence hub_durability_persistence(const struct hub *hub);
const char *hub_persistence_name(enum hub_persistence p);

/* Registers the checks the configured mode needs; before hub_redis_start().
 * Logs the mode. */
void hub_durability_init(struct hub *hub);
void hub_durability_free(struct hub *hub);

#endif
