/*
 * uvstream.h - a libuv stream of either kind, TCP or unix socket, in one storage: the
 * gateway's sessions and listeners, its milter connections and the deliverer's LMTP
 * connections open one or the other and then use it as a stream or a handle.
 */
#ifndef SLUICE_UVSTREAM_H
#define SLUICE_UVSTREAM_H

#include <uv.h>

union uvstream {
    uv_handle_t handle;
    uv_stream_t stream;
    uv_tcp_t tcp;
    uv_pipe_t pipe;
};

#endif
