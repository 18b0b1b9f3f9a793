#include "hub/embedded_redis.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "hub/log.h"
#include "hub/util.h"

struct hub_embedded_redis {
	pid_t pid;
	int port;
	char dir[64];
};

static int free_port(void)
{
	struct sockaddr_in sa = { .sin_family = AF_INET };
	socklen_t sl = sizeof(sa);
	int fd = socket(AF_INET, SOCK_STREAM, 0), port = -1;

	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (fd >= 0 && !bind(fd, (struct sockaddr *)&sa, sizeof(sa)) &&
	    !getsockname(fd, (struct sockaddr *)&sa, &sl))
		port = ntohs(sa.sin_port);
	if (fd >= 0)
		close(fd);
	return port;
}

/* Sends PING and waits for +PONG; blocking, start-up only. */
static int ping(int port)
{
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
	struct timeval tv = { 0, 200000 };
	char buf[16];
	int fd = socket(AF_INET, SOCK_STREAM, 0), ok = -1;

	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (fd < 0)
		return -1;
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	if (!connect(fd, (struct sockaddr *)&sa, sizeof(sa)) &&
	    write(fd, "PING\r\n", 6) == 6 && read(fd, buf, sizeof(buf)) >= 5 &&
	    !memcmp(buf, "+PONG", 5))
		ok = 0;
	close(fd);
	return ok;
}

static void rm_dir(const char *dir)
{
	DIR *d = opendir(dir);
	struct dirent *de;
	char path[512];

	if (!d)
		return;
	while ((de = readdir(d))) {
		if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
			continue;
		snprintf(path, sizeof(path), "%s/%s", dir, de->d_name);
		unlink(path);
	}
	closedir(d);
	rmdir(dir);
}

struct hub_embedded_redis *hub_embedded_redis_start(const char *binary,
						    int *port_out,
						    char *err, size_t errlen)
{
	struct hub_embedded_redis *e = hub_xcalloc(1, sizeof(*e));
	char portstr[16];

	snprintf(e->dir, sizeof(e->dir), "/tmp/iot-hub-redis-XXXXXX");
	if (!mkdtemp(e->dir)) {
		snprintf(err, errlen, "embedded redis: mkdtemp: %s", strerror(errno));
		free(e);
		return NULL;
	}
	for (int attempt = 0; attempt < 5; attempt++) {
		e->port = free_port();
		if (e->port <= 0)
			continue;
		snprintf(portstr, sizeof(portstr), "%d", e->port);
		pid_t parent = getpid();
		e->pid = fork();
		if (e->pid < 0) {
			snprintf(err, errlen, "embedded redis: fork: %s", strerror(errno));
			break;
		}
		if (e->pid == 0) {
			prctl(PR_SET_PDEATHSIG, SIGTERM);
			if (getppid() != parent)
				_exit(1);
			int devnull = open("/dev/null", O_RDWR);
			if (devnull >= 0) {
				dup2(devnull, 0);
				dup2(devnull, 1);
			}
			execlp(binary, binary, "--port", portstr, "--bind", "127.0.0.1",
			       "--save", "", "--appendonly", "no", "--dir", e->dir,
			       "--daemonize", "no", "--loglevel", "warning",
			       "--protected-mode", "yes", (char *)NULL);
			fprintf(stderr, "embedded redis: cannot run %s: %s\n", binary,
				strerror(errno));
			_exit(127);
		}
		for (int i = 0; i < 100; i++) {
			int status;
			if (!ping(e->port)) {
				*port_out = e->port;
				return e;
			}
			if (waitpid(e->pid, &status, WNOHANG) == e->pid) {
				e->pid = 0;
				break; /* it died: maybe the port was taken, try again */
			}
			struct timespec ts = { 0, 100 * 1000 * 1000 };
			nanosleep(&ts, NULL);
		}
		if (e->pid > 0) {
			kill(e->pid, SIGKILL);
			waitpid(e->pid, NULL, 0);
			e->pid = 0;
		}
	}
	if (!*err)
		snprintf(err, errlen, "embedded redis: %s did not start (is redis-server installed?)",
			 binary);
	rm_dir(e->dir);
	free(e);
	return NULL;
}

void hub_embedded_redis_stop(struct hub_embedded_redis *e)
{
	if (!e)
		return;
	if (e->pid > 0) {
		kill(e->pid, SIGTERM);
		for (int i = 0; i < 50; i++) {
			if (waitpid(e->pid, NULL, WNOHANG) == e->pid) {
				e->pid = 0;
				break;
			}
			struct timespec ts = { 0, 100 * 1000 * 1000 };
			nanosleep(&ts, NULL);
		}
		if (e->pid > 0) {
			kill(e->pid, SIGKILL);
			waitpid(e->pid, NULL, 0);
		}
	}
	rm_dir(e->dir);
	free(e);
}
