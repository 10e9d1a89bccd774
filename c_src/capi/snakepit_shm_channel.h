/* C ABI of the message channel's worker end (docs/CHANNEL.md), for the Python client.
 * Linux only. Return codes: 0 ok, 1 would block (SPSHM_CH_WOULD_BLOCK), 2 a region
 * message was received (SPSHM_CH_REGION), or a negative SPSHM_E* code with a message in
 * `err`; SPSHM_E_CLOSED's message is the close reason ("peer_closed", "protocol_error"...). */
#ifndef SNAKEPIT_SHM_CHANNEL_H
#define SNAKEPIT_SHM_CHANNEL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SPSHM_CH_WOULD_BLOCK 1
#define SPSHM_CH_REGION 2

typedef struct spshm_channel spshm_channel;

/* Layout JSON of the channel memory (ring.hpp layout_description()). */
size_t spshm_channel_layout(char* buf, size_t buflen);

/* Connects to the owner's socket, authenticates with the 64-hex-digit token, maps the
 * rings. ack_mode: 0 immediate, 1 batch, 2 deferred. */
int spshm_ch_connect(const char* path, const char* token_hex, int ack_mode, uint32_t max_batch,
                     uint64_t flush_interval_ns, uint64_t max_message_size, int timeout_ms,
                     spshm_channel** out, char* err, size_t errlen);
/* As spshm_ch_connect, giving up when cancel_fd (-1: never) becomes readable (the caller
 * cancelled: an asyncio task, a timeout): before the hello nothing reached the owner;
 * after it the socket is shut down, so the owner can no longer accept this connection
 * (it drops it and keeps listening), unless its welcome had already come: *accepted_out
 * is then 1 (the owner took this connection as its one worker and sees it close). A
 * cancelled connect fails with SPSHM_E_IO_ERROR and its message says which. */
int spshm_ch_connect_cancellable(const char* path, const char* token_hex, int ack_mode,
                                 uint32_t max_batch, uint64_t flush_interval_ns,
                                 uint64_t max_message_size, int timeout_ms, int cancel_fd,
                                 int* accepted_out, spshm_channel** out, char* err, size_t errlen);
void spshm_ch_free(spshm_channel* ch);
void spshm_ch_close(spshm_channel* ch);
int spshm_ch_wait_fd(spshm_channel* ch);
int spshm_ch_transport(spshm_channel* ch); /* 1 shm, 2 socket */
uint32_t spshm_ch_inline_max(spshm_channel* ch);
uint64_t spshm_ch_ring_size(spshm_channel* ch);

int spshm_ch_send(spshm_channel* ch, const void* data, uint64_t length, char* err, size_t errlen);
/* A sealed memfd holding a copy of data (for messages above inline_max). On a failure
 * *errno_out (if not NULL) is the OS's errno (EMFILE, EFBIG, EPERM, ENOMEM...; 0 if
 * none) and err says what failed and what to do. */
int spshm_ch_prepare_region(const void* data, uint64_t length, int* fd_out, int* errno_out,
                            char* err, size_t errlen);
/* Sends a prepared memfd; on 0 the channel took the fd, on 1 the caller keeps it. */
int spshm_ch_send_region(spshm_channel* ch, int fd, uint64_t size, char* err, size_t errlen);
/* Receives one message: 0 with *length_out bytes in buf (buflen >= inline_max), or 2 with a
 * write-sealed memfd (*fd_out, the caller owns it) of *size_out bytes, or 1. */
int spshm_ch_recv(spshm_channel* ch, void* buf, size_t buflen, uint32_t* length_out, int* fd_out,
                  uint64_t* size_out, char* err, size_t errlen);
/* As spshm_ch_recv, but waits: re-checks the ring for up to spin_ns (never past timeout_ms,
 * and not after a close), then sleeps on the doorbell up to timeout_ms (-1 forever). 1:
 * nothing in time, or a signal interrupted the wait. Call it without holding a lock others
 * need (Python: ctypes releases the GIL). */
int spshm_ch_recv_wait(spshm_channel* ch, void* buf, size_t buflen, uint32_t* length_out,
                       int* fd_out, uint64_t* size_out, uint64_t spin_ns, int timeout_ms, char* err,
                       size_t errlen);
/* The per-message calls of a language binding with a costly foreign-function call
 * (Python's ctypes converts every argument on every call): everything that does not
 * change between messages lives in this block, filled once, so that a receive takes two
 * arguments and a send three. Results land in the block. */
typedef struct spshm_ch_io {
  spshm_channel* ch; /* in */
  void* buf;         /* in: where inline messages are copied (buflen >= inline_max) */
  uint64_t buflen;   /* in */
  uint64_t spin_ns;  /* in: how long recv re-checks the ring before sleeping */
  uint64_t size;     /* out: bytes of a region message */
  uint32_t length;   /* out: bytes of an inline message */
  int32_t fd;        /* out: the memfd of a region message (the caller owns it) */
  char err[256];     /* out: the error message of a negative result */
} spshm_ch_io;
/* spshm_ch_recv_wait with the block's arguments; length, fd and size are written only
 * when a message is returned (0 or 2). */
int spshm_ch_recv_io(spshm_ch_io* io, int timeout_ms);
/* Takes up to max_count messages that are already there, without waiting (a batch for
 * bindings whose calls are costly): inline messages are appended to buf as u32 length +
 * bytes (io->length: bytes used), stopping before one that does not fit. Returns how many
 * (>= 0); if a region message came after them, io->fd (the caller owns it) and io->size
 * describe it, else io->fd is -1 and io->size is 1 if the buffer filled up before the ring
 * was empty (call again), 0 if it is empty. Negative: an error, or the channel closed with nothing
 * taken (as spshm_ch_recv). */
int spshm_ch_recv_batch_io(spshm_ch_io* io, void* buf, uint64_t buflen, uint32_t max_count);
/* spshm_ch_send with the block's channel and error buffer. */
int spshm_ch_send_io(spshm_ch_io* io, const void* data, uint64_t length);
/* 1: sleep on wait_fd now; 0: something is ready, retry. */
int spshm_ch_prepare_wait(spshm_channel* ch, int want_data, int want_space, uint64_t need);
void spshm_ch_handle_events(spshm_channel* ch);
void spshm_ch_flush(spshm_channel* ch);
/* Stats as JSON. Returns the length needed. */
size_t spshm_ch_stats(spshm_channel* ch, char* buf, size_t buflen);

#ifdef __cplusplus
}
#endif
#endif
