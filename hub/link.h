/*
 * link.h - a connection that holds devices (a gateway's WebSocket), as the
 * modules that are not the gateway protocol see it: an opaque, refcounted
 * handle to send messages down and to ask what it holds. The gateway module
 * implements it and answers which local link holds a device; the command
 * engine uses it to deliver commands without knowing the protocol.
 */
#ifndef HUB_LINK_H
#define HUB_LINK_H

#include <stdbool.h>
#include <stddef.h>

struct hub;
struct hub_link;

struct hub_link_ops {
	/* "<instance>:<run token>:<serial>", as in the registry's `conn`. */
	const char *(*id)(const struct hub_link *l);
	/* Announced on this link and not taken over since. */
	bool (*has_device)(const struct hub_link *l, const char *device);
	/* Still open and not closing: a send can reach the gateway. */
	bool (*open)(const struct hub_link *l);
	/* Queues msg[0..len) (copied), in order with the link's other
	 * messages. Nothing happens on a link that is not open. */
	void (*send)(struct hub_link *l, const char *msg, size_t len);
	/* A holder that keeps the link across callbacks takes a reference. */
	void (*hold)(struct hub_link *l);
	void (*release)(struct hub_link *l);
};

struct hub_link {
	const struct hub_link_ops *ops;
};

/* Who answers hub_link_for_device: set by the gateway module at start. */
typedef struct hub_link *(*hub_link_lookup_fn)(void *ctx, const char *device);
void hub_links_provide(struct hub *hub, hub_link_lookup_fn lookup, void *ctx);

/* The open local link holding device, or NULL (not here, or no provider). */
struct hub_link *hub_link_for_device(struct hub *hub, const char *device);

static inline const char *hub_link_id(const struct hub_link *l)
{
	return l->ops->id(l);
}

static inline bool hub_link_has_device(const struct hub_link *l, const char *device)
{
	return l->ops->has_device(l, device);
}

static inline bool hub_link_open(const struct hub_link *l)
{
	return l->ops->open(l);
}

static inline void hub_link_send(struct hub_link *l, const char *msg, size_t len)
{
	l->ops->send(l, msg, len);
}

static inline void hub_link_hold(struct hub_link *l)
{
	l->ops->hold(l);
}

static inline void hub_link_release(struct hub_link *l)
{
	l->ops->release(l);
}

#endif
