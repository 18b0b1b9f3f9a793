/*
 * lifecycle.h - starting and stopping the modules of struct hub (the table
 * in hub/main.c, the hooks in hub/module.h). Loop thread only.
 */
#ifndef HUB_LIFECYCLE_H
#define HUB_LIFECYCLE_H

#include <stddef.h>

struct hub;

/* Starts the modules in table order. On a failure, stops and frees those
 * already started and returns -1 with err. */
int hub_modules_start(struct hub *hub, char *err, size_t errlen);

/* Frees the modules' objects, in reverse order (after the loop is gone). */
void hub_modules_free(struct hub *hub);

/* Starts a graceful shutdown (idempotent): stop accepting, drain gateways,
 * disconnect Redis, then end the loop. */
void hub_begin_shutdown(struct hub *hub);

#endif
