#define _GNU_SOURCE /* accept4 */
#include <libwebsockets.h>

#include "hub/listener.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "hub/hub.h"
#include "hub/log.h"
#include "hub/util.h"

#define ACCEPTS_PER_WAKE 64

struct hub_listener {
	struct hub *hub;
	int fd;
	struct lws *wsi;
	int port;
};

struct hub_listener *hub_listener_open(struct hub *hub, char *err, size_t errlen)
{
	struct sockaddr_storage ss;
	socklen_t sl;
	const char *host = hub->cfg.listen_host;
	int one = 1, fd;

	memset(&ss, 0, sizeof(ss));
	if (strchr(host, ':')) {
		struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;
		s6->sin6_family = AF_INET6;
		s6->sin6_port = htons((uint16_t)hub->cfg.listen_port);
		if (inet_pton(AF_INET6, host, &s6->sin6_addr) != 1)
			goto bad_host;
		sl = sizeof(*s6);
	} else {
		struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;
		s4->sin_family = AF_INET;
		s4->sin_port = htons((uint16_t)hub->cfg.listen_port);
		if (!strcmp(host, "localhost"))
			host = "127.0.0.1";
		if (inet_pton(AF_INET, host, &s4->sin_addr) != 1)
			goto bad_host;
		sl = sizeof(*s4);
	}
	fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		snprintf(err, errlen, "listen %s: socket: %s", hub->cfg.listen, strerror(errno));
		return NULL;
	}
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
	if (bind(fd, (struct sockaddr *)&ss, sl) || listen(fd, 4096)) {
		snprintf(err, errlen, "listen %s: %s", hub->cfg.listen, strerror(errno));
		close(fd);
		return NULL;
	}
	sl = sizeof(ss);
	getsockname(fd, (struct sockaddr *)&ss, &sl);

	struct hub_listener *l = hub_xcalloc(1, sizeof(*l));
	l->hub = hub;
	l->fd = fd;
	l->port = ntohs(ss.ss_family == AF_INET6 ?
			((struct sockaddr_in6 *)&ss)->sin6_port :
			((struct sockaddr_in *)&ss)->sin_port);
	return l;

bad_host:
	snprintf(err, errlen, "listen: \"%s\" is not an IP address", host);
	return NULL;
}

int hub_listener_start(struct hub_listener *l)
{
	lws_sock_file_fd_type fd;

	/* lws closes what it adopts: give it a dup, keep ours for close(). */
	fd.filefd = dup(l->fd);
	if (fd.filefd < 0)
		return -1;
	l->wsi = lws_adopt_descriptor_vhost(l->hub->vh, LWS_ADOPT_RAW_FILE_DESC, fd,
					    hub_listener_protocol.name, NULL);
	if (!l->wsi) {
		close(fd.filefd);
		return -1;
	}
	lws_set_opaque_user_data(l->wsi, l);
	return 0;
}

int hub_listener_port(const struct hub_listener *l)
{
	return l->port;
}

static void accept_some(struct hub_listener *l, int lfd)
{
	struct hub *hub = l->hub;

	for (int i = 0; i < ACCEPTS_PER_WAKE; i++) {
		int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
				hub_warn("accept: %s", strerror(errno));
			return;
		}
		if (hub->draining) {
			close(fd);
			continue;
		}
		int one = 1;
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		if (!lws_adopt_socket_vhost(hub->vh, fd)) {
			/* lws closed it */
			hub_warn("could not adopt an accepted socket");
			continue;
		}
	}
}

static int listener_cb(struct lws *wsi, enum lws_callback_reasons reason,
		       void *user, void *in, size_t len)
{
	struct hub_listener *l;

	switch (reason) {
	case LWS_CALLBACK_FILTER_PROTOCOL_CONNECTION:
	case LWS_CALLBACK_HTTP_CONFIRM_UPGRADE:
		return 1; /* internal protocol: never an upgrade target */
	case LWS_CALLBACK_RAW_RX_FILE:
		l = lws_get_opaque_user_data(wsi);
		if (!l || l->fd < 0)
			return -1; /* closed by hub_listener_close() */
		accept_some(l, lws_get_socket_fd(wsi));
		break;
	case LWS_CALLBACK_RAW_CLOSE_FILE:
		l = lws_get_opaque_user_data(wsi);
		if (l && l->wsi == wsi)
			l->wsi = NULL;
		break;
	default:
		break;
	}
	return 0;
}

const struct lws_protocols hub_listener_protocol = {
	"hub-listener-internal", listener_cb, 0, 0, 0, NULL, 0
};

void hub_listener_close(struct hub_listener *l)
{
	if (!l || l->fd < 0)
		return;
	if (l->wsi) {
		lws_set_opaque_user_data(l->wsi, NULL);
		lws_set_timeout(l->wsi, PENDING_TIMEOUT_KILLED_BY_PARENT, LWS_TO_KILL_ASYNC);
		l->wsi = NULL;
	}
	close(l->fd);
	l->fd = -1;
}

void hub_listener_free(struct hub_listener *l)
{
	if (!l)
		return;
	if (l->fd >= 0)
		close(l->fd);
	free(l);
}
