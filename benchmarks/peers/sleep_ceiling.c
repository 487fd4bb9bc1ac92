/* The machine's ceiling for the "view that waits 10 ms" workload: no
 * Python, no threads.  N pre-forked processes, each with its own
 * SO_REUSEPORT socket (the kernel spreads connections), answer every
 * request 10 ms after it arrives from a libevent timer (evhttp, timerfd
 * precision).  Whatever it loses against connections / 10 ms is what the
 * load generator sharing the cores and the scheduler cost on this machine,
 * before any server does any work.  Not a peer: a reference (CEILINGS).
 *
 * usage: sleep-ceiling HOST PORT WORKERS      (built by setup_peers.sh)
 */
#include <arpa/inet.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/util.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static struct event_base *base;

static void answer(evutil_socket_t fd, short what, void *arg)
{
    struct evhttp_request *req = arg;
    struct evbuffer *body = evbuffer_new();
    (void)fd;
    (void)what;
    if (body == NULL || evbuffer_add(body, "slept 10 ms", 11) != 0) {
        evhttp_send_error(req, 500, NULL);
    } else {
        evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Type", "text/plain");
        evhttp_send_reply(req, 200, "OK", body);
    }
    if (body)
        evbuffer_free(body);
}

static void request(struct evhttp_request *req, void *arg)
{
    struct timeval tv = {0, 10000};
    (void)arg;
    if (event_base_once(base, -1, EV_TIMEOUT, answer, req, &tv) != 0)
        evhttp_send_error(req, 500, NULL);
}

static int serve(const char *host, int port)
{
    int one = 1, fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    if (fd < 0 || inet_pton(AF_INET, host, &sa.sin_addr) != 1 ||
        setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) != 0 ||
        bind(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0 || listen(fd, 1024) != 0 ||
        evutil_make_socket_nonblocking(fd) != 0) {
        perror("sleep-ceiling: socket");
        return 1;
    }
    struct event_config *cfg = event_config_new();
    if (cfg == NULL || event_config_set_flag(cfg, EVENT_BASE_FLAG_PRECISE_TIMER) != 0 ||
        (base = event_base_new_with_config(cfg)) == NULL) {
        fprintf(stderr, "sleep-ceiling: cannot create the event base\n");
        return 1;
    }
    event_config_free(cfg);
    struct evhttp *http = evhttp_new(base);
    if (http == NULL || evhttp_accept_socket(http, fd) != 0) {
        fprintf(stderr, "sleep-ceiling: cannot serve HTTP\n");
        return 1;
    }
    evhttp_set_gencb(http, request, NULL);
    return event_base_dispatch(base) < 0;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: sleep-ceiling HOST PORT WORKERS\n");
        return 2;
    }
    int port = atoi(argv[2]), workers = atoi(argv[3]);
    if (port <= 0 || port > 65535 || workers < 1 || workers > 64) {
        fprintf(stderr, "sleep-ceiling: bad port or worker count\n");
        return 2;
    }
    for (int i = 0; i < workers; i++) {
        pid_t pid = fork();
        if (pid < 0) {
            perror("sleep-ceiling: fork");
            return 1;
        }
        if (pid == 0)
            return serve(argv[1], port);
    }
    /* SIGTERM to this process ends the children too (the harness kills the group) */
    int status = 0;
    while (wait(&status) > 0)
        ;
    return 0;
}
