/*
 * cmd_api.h - the commands rows of the operator API (docs/commands.md):
 * create, get, cancel, list per device, fleet rollouts. Answers through
 * struct hub_req (hub/http.h); no lws here.
 */
#ifndef HUB_CMD_API_H
#define HUB_CMD_API_H

struct hub;

/* Registers the routes with hub/http.c (the commands module's start). */
void cmd_api_register(struct hub *hub);

#endif
