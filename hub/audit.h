/*
 * audit.h - the audit log of operator actions (docs/operations.md "Audit
 * log"): who (the API key's name, or "signal" for a reload), from where
 * (the peer address), what (an action name and its target), when, and the
 * action's own details as JSON. Entries go to one Redis stream, trimmed by
 * count (audit-max-entries) and age (audit-retention-days), and are read
 * back newest first at GET /v1/audit (admin scope).
 */
#ifndef HUB_AUDIT_H
#define HUB_AUDIT_H

#include <stddef.h>

struct hub;
struct hub_req;

/* Records an action taken for rq's caller (rq NULL: the hub itself, e.g. a
 * SIGHUP reload). action is a short dotted name ("command.create"), target
 * what it acted on (a command id, a device, "sub:<gateway>"), detail a JSON
 * object or NULL. Fire and forget: an entry Redis does not take is logged
 * and lost, never retried, and never delays the action. */
void hub_audit(struct hub *hub, const struct hub_req *rq, const char *action,
	       const char *target, const char *detail);

extern const struct hub_module hub_audit_module;

#endif
