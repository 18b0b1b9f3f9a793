#include "hub/loop.h"

#include <signal.h>
#include <string.h>
#include <sys/resource.h>

#include "hub/hub.h"
#include "hub/http.h"
#include "hub/keepalive.h"
#include "hub/listener.h"
#include "hub/log.h"
#include "hub/lws_quirks.h"
#include "hub/module.h"
#include "hub/redis.h"
#include "hub/util.h"

/* lws 4.1.6's libev backend arms its timer for lws_sul only from its own
 * idle and timer callbacks: a sul scheduled while no I/O happens never fires,
 * and one scheduled earlier than the armed time waits for it (ev_timer_start
 * on an active watcher is a no-op). A heartbeat sul keeps that timer armed,
 * so any sul fires at most HEARTBEAT_US late on an idle loop. */
#define HEARTBEAT_US (20 * 1000)

static lws_sorted_usec_list_t sul_heartbeat;
static lws_usec_t heartbeat_due;     /* when it should run next (0: first run) */
static struct lws_context *signal_ctx;
static struct hub *signal_hub;
#define MAX_PROTOCOLS 16
static struct lws_protocols protocols[MAX_PROTOCOLS];
static lws_retry_bo_t idle_policy;
static struct lws_token_limits token_limits;

/* lws's log lines go through the HTTP module first (it acts on one). */
static void lws_emit(int level, const char *line)
{
	if (hub_http_lws_log(line))
		hub_debug("lws: %s", line);
	else
		hub_log_lws_emit(level, line);
}

static void on_signal(int sig)
{
	if (!signal_hub)
		return;
	if (sig == SIGHUP)
		signal_hub->sig_hup = 1;
	else
		signal_hub->sig_term = 1;
	if (signal_ctx)
		lws_cancel_service(signal_ctx);
}

static void raise_nofile(void)
{
	struct rlimit rl;

	if (!getrlimit(RLIMIT_NOFILE, &rl) && rl.rlim_cur < rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
}

int hub_loop_create(struct hub *hub, char *err, size_t errlen)
{
	struct lws_context_creation_info info;
	struct sigaction sa;
	bool tls = hub->cfg.tls_cert != NULL;

	raise_nofile(); /* lws sizes its fd table from the limit */
	lws_set_log_level(LLL_ERR | LLL_WARN | (hub_log_threshold >= HUB_LOG_DEBUG ? LLL_NOTICE|LLL_INFO|LLL_DEBUG : 0),
			  lws_emit);

	/* The modules' protocols in table order (the HTTP module's first:
	 * lws binds new connections to protocols[0]), then the services'. */
	size_t np = 0;
	memset(protocols, 0, sizeof(protocols));
	for (size_t i = 0; i < hub->nmodules; i++)
		if (hub->modules[i]->protocol && np < MAX_PROTOCOLS - 3)
			hub->modules[i]->protocol(hub, &protocols[np++]);
	protocols[np++] = hub_redis_protocol;
	protocols[np++] = hub_listener_protocol;

	memset(&info, 0, sizeof(info));
	info.options = LWS_SERVER_OPTION_EXPLICIT_VHOSTS | LWS_SERVER_OPTION_LIBEV |
		       LWS_SERVER_OPTION_UV_NO_SIGSEGV_SIGFPE_SPIN;
	if (tls)
		info.options |= LWS_SERVER_OPTION_DO_SSL_GLOBAL_INIT;
	info.user = hub;
	info.pt_serv_buf_size = 32768;
	/* Room for the documented header limits (an 8 KiB token and the
	 * rest); a larger header block is answered 431 (hub/http.c). The URL
	 * tokens are cut one byte past their limit, so a longer one is seen
	 * and answered 414 instead of overflowing the block. */
	info.max_http_header_data = HUB_HTTP_HEADER_MAX;
	static const enum lws_token_indexes url_tokens[] = {
		WSI_TOKEN_GET_URI, WSI_TOKEN_POST_URI, WSI_TOKEN_PUT_URI,
		WSI_TOKEN_PATCH_URI, WSI_TOKEN_DELETE_URI, WSI_TOKEN_OPTIONS_URI,
		WSI_TOKEN_HEAD_URI, WSI_TOKEN_HTTP_URI_ARGS,
	};
	for (size_t i = 0; i < sizeof(url_tokens) / sizeof(url_tokens[0]); i++)
		token_limits.token_limit[url_tokens[i]] = HUB_HTTP_URI_MAX + 1;
	info.token_limits = &token_limits;
	/* Handshakes (TLS included) and per-chunk body waits. */
	info.timeout_secs = (unsigned)hub->cfg.http_header_timeout_s;
	hub->ctx = lws_create_context(&info);
	if (!hub->ctx) {
		snprintf(err, errlen, "cannot create the lws context (is libwebsockets-evlib-ev installed?)");
		return -1;
	}

	memset(&info, 0, sizeof(info));
	info.port = CONTEXT_PORT_NO_LISTEN_SERVER; /* we own the listener */
	info.protocols = protocols;
	info.vhost_name = "iot-hub";
	/* Dead peers (no FIN: power loss, NAT expiry) are found by PING/PONG:
	 * the hub pings ping-interval-s after the last PONG and hangs up when
	 * none came for ping-timeout-s, so their devices go offline. Not lws's
	 * own validity timer (its default is on, 300 s): a policy without
	 * hangup turns it off, hub/keepalive.h says why. */
	idle_policy.secs_since_valid_ping = 0;
	idle_policy.secs_since_valid_hangup = 0;
	info.retry_and_idle_policy = &idle_policy;
	hub_ka_init(&hub->ka, (int64_t)hub->cfg.ping_interval_s * 1000000,
		    ((int64_t)hub->cfg.ping_timeout_s - hub->cfg.ping_interval_s) * 1000000);
	/* Every connection that has not been upgraded has a deadline: its
	 * request line and headers (slowloris), an idle keep-alive, a body
	 * (hub/http.c). */
	info.timeout_secs_ah_idle = (unsigned)hub->cfg.http_header_timeout_s;
	info.keepalive_timeout = hub->cfg.http_keepalive_timeout_s;
	info.alpn = "http/1.1";
	info.options = LWS_SERVER_OPTION_LIBEV;
	if (tls) {
		info.options |= LWS_SERVER_OPTION_DO_SSL_GLOBAL_INIT;
		info.ssl_cert_filepath = hub->cfg.tls_cert;
		info.ssl_private_key_filepath = hub->cfg.tls_key;
		if (hub->cfg.tls_client_ca) {
			info.ssl_ca_filepath = hub->cfg.tls_client_ca;
			info.options |= LWS_SERVER_OPTION_REQUIRE_VALID_OPENSSL_CLIENT_CERT;
		}
	}
	hub->vh = lws_create_vhost(hub->ctx, &info);
	if (!hub->vh) {
		snprintf(err, errlen, "cannot create the vhost%s", tls ?
			 " (check tls-cert, tls-key and tls-client-ca)" : "");
		return -1;
	}

	/* After lws: its event-lib backends install handlers of their own
	 * (SIGHUP would shut down). Ours only set a flag and wake the loop. */
	signal_ctx = hub->ctx;
	signal_hub = hub;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGHUP, &sa, NULL);
	sa.sa_handler = SIG_IGN;
	sigaction(SIGPIPE, &sa, NULL);
	return 0;
}

/* Also the loop's lag: how late the heartbeat runs is how long the loop
 * was busy with other work (iot_hub_loop_lag_seconds). */
static void heartbeat(lws_sorted_usec_list_t *sul)
{
	lws_usec_t now = lws_now_usecs();

	if (heartbeat_due && signal_hub)
		hub_hist_observe(&signal_hub->metrics.loop_lag,
				 now > heartbeat_due ? (double)(now - heartbeat_due) / 1e6 : 0);
	heartbeat_due = now + HEARTBEAT_US;
	hub_quirk_disarm();
	lws_sul_schedule(signal_ctx, 0, sul, heartbeat, HEARTBEAT_US);
}

/* ---- keepalive: one timer for every WebSocket (hub/keepalive.h) ---------- */

/* Connections handled per timer run: a storm's worth of PINGs falls due
 * together 30 s later, and is spread over loop turns. */
#define KA_BATCH 512

static void ka_fire(lws_sorted_usec_list_t *sul);

static void ka_arm(struct hub *hub)
{
	int64_t due = hub_ka_next_due(&hub->ka), now;

	/* an armed timer that is not later is kept (one that finds nothing due
	 * arms itself again) */
	if (!due || (hub->ka_armed_us && hub->ka_armed_us <= due))
		return;
	now = hub_mono_us();
	hub->ka_armed_us = due;
	lws_sul_schedule(hub->ctx, 0, &hub->sul_keepalive, ka_fire,
			 due > now ? (lws_usec_t)(due - now) : 1);
}

static void ka_ping(struct hub_ka_entry *e, void *arg)
{
	(void)arg;
	lws_callback_on_writable(e->owner);
}

static void ka_hangup(struct hub_ka_entry *e, void *arg)
{
	(void)arg;
	/* closed on the next loop turn: CLOSED reaches its protocol */
	lws_set_timeout(e->owner, PENDING_TIMEOUT_KILLED_BY_PARENT, LWS_TO_KILL_ASYNC);
}

static void ka_fire(lws_sorted_usec_list_t *sul)
{
	struct hub *hub = lws_container_of(sul, struct hub, sul_keepalive);
	int64_t now = hub_mono_us();

	hub->ka_armed_us = 0;
	if (hub->exiting)
		return;
	if (hub_ka_expire(&hub->ka, now, KA_BATCH, ka_ping, ka_hangup, hub) == KA_BATCH) {
		hub->ka_armed_us = now;
		lws_sul_schedule(hub->ctx, 0, &hub->sul_keepalive, ka_fire, 1);
		return;
	}
	ka_arm(hub);
}

void hub_keepalive_start(struct hub *hub, struct hub_ka_entry *e, struct lws *wsi)
{
	e->owner = wsi;
	hub_ka_valid(&hub->ka, e, hub_mono_us());
	ka_arm(hub);
}

void hub_keepalive_pong(struct hub *hub, struct hub_ka_entry *e)
{
	if (e->where == HUB_KA_NONE)
		return;
	hub_ka_valid(&hub->ka, e, hub_mono_us());
	ka_arm(hub);
}

void hub_keepalive_stop(struct hub *hub, struct hub_ka_entry *e)
{
	hub_ka_remove(&hub->ka, e);
}

int hub_keepalive_writeable(struct hub *hub, struct hub_ka_entry *e)
{
	unsigned char buf[LWS_PRE + 8];
	int64_t now = hub_mono_us();

	(void)hub;
	if (!e->ping_owed)
		return 0;
	e->ping_owed = 0;
	/* with a payload (the clock, as lws's own): lws 4.1.6 gives the
	 * protocol no RECEIVE_PONG for an empty PONG */
	memcpy(buf + LWS_PRE, &now, sizeof(now));
	if (lws_write(e->owner, buf + LWS_PRE, sizeof(now), LWS_WRITE_PING) < 0)
		return -1;
	lws_callback_on_writable(e->owner);
	return 1;
}

void hub_loop_run(struct hub *hub)
{
	heartbeat(&sul_heartbeat);
	lws_cancel_service(hub->ctx); /* one I/O event arms the backend's timer */
	while (!hub->exiting)
		if (lws_service(hub->ctx, 0) < 0)
			break;
}

void hub_loop_stop(struct hub *hub)
{
	hub->exiting = true;
	lws_sul_cancel(&sul_heartbeat);
	lws_sul_cancel(&hub->sul_keepalive);
	/* With an event library the first destroy only breaks the loop. */
	lws_context_destroy(hub->ctx);
}

void hub_loop_destroy(struct hub *hub)
{
	signal_ctx = NULL;
	if (hub->ctx)
		lws_context_destroy(hub->ctx);
	hub->ctx = NULL;
	signal_hub = NULL;
}
