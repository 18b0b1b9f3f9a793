/*
 * log.h - level-checked logging to stderr. lws's own log lines are routed here
 * too (hub_log_lws_emit). Never log a token or key.
 */
#ifndef HUB_LOG_H
#define HUB_LOG_H

enum hub_log_level { HUB_LOG_ERROR = 0, HUB_LOG_WARN, HUB_LOG_INFO, HUB_LOG_DEBUG };

/* Current threshold; set once at start-up and on reload. */
extern int hub_log_threshold;

#define hub_log(lvl, ...)                                                     \
	do {                                                                  \
		if ((lvl) <= hub_log_threshold)                               \
			hub_log_write((lvl), __VA_ARGS__);                     \
	} while (0)
#define hub_err(...)   hub_log(HUB_LOG_ERROR, __VA_ARGS__)
#define hub_warn(...)  hub_log(HUB_LOG_WARN, __VA_ARGS__)
#define hub_info(...)  hub_log(HUB_LOG_INFO, __VA_ARGS__)
#define hub_debug(...) hub_log(HUB_LOG_DEBUG, __VA_ARGS__)

void hub_log_write(int level, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

/* Parses "error|warn|info|debug"; returns the level or -1. */
int hub_log_parse_level(const char *s);

/* Tag printed on every line (the instance id); copied. */
void hub_log_set_tag(const char *tag);

/* Target for lws_set_log_level(): maps lws levels onto ours. */
void hub_log_lws_emit(int lws_level, const char *line);

#endif
