/*
 * cmd_api.h - the commands rows of the operator API (docs/commands.md):
 * create, get, cancel, list per device, fleet rollouts. Answers through
 * struct hub_req (hub/http.h); no lws here.
 */
#ifndef HUB_CMD_API_H
#define HUB_CMD_API_H

/* The module (hub/module.h): registers the routes; after cmd_module. */
struct hub_module;
extern const struct hub_module cmd_api_module;

#endif
