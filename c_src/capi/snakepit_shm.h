/* C ABI of the snakepit_shm core, for the Python client (ctypes) and other languages.
 *
 * The Python client maps segments itself with the stdlib `mmap` module (so Python's
 * buffer protocol guards the mapping's lifetime); it calls this library only for what
 * Python cannot do: atomic updates of the header's holder table and refcount, and
 * decryption of encrypted regions. Every function returns 0 on success or a negative
 * SPSHM_E* code, and writes a NUL-terminated message into `err` (if non-NULL).
 */
#ifndef SNAKEPIT_SHM_CAPI_H
#define SNAKEPIT_SHM_CAPI_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Error codes: the negated position of spshm::Errc plus one (SPSHM_E_NOT_FOUND == -2 ...). */
#define SPSHM_OK 0
#define SPSHM_E_INVALID_ARGUMENT -1
#define SPSHM_E_NOT_FOUND -2
#define SPSHM_E_ALREADY_EXISTS -3
#define SPSHM_E_PERMISSION_DENIED -4
#define SPSHM_E_NO_SPACE -5
#define SPSHM_E_TOO_LARGE -6
#define SPSHM_E_CORRUPT -7
#define SPSHM_E_UNSUPPORTED_VERSION -8
#define SPSHM_E_NOT_OURS -9
#define SPSHM_E_SEALED -10
#define SPSHM_E_BUSY -11
#define SPSHM_E_EXPIRED -12
#define SPSHM_E_DEALLOCATED -13
#define SPSHM_E_CLOSED -14
#define SPSHM_E_OUT_OF_BOUNDS -15
#define SPSHM_E_TAMPERED -16
#define SPSHM_E_HOLDER_TABLE_FULL -17
#define SPSHM_E_MLOCK_FAILED -18
#define SPSHM_E_UNSUPPORTED -19
#define SPSHM_E_IO_ERROR -20

/* ABI version of this header; bumped on any incompatible change. */
int spshm_abi_version(void);

/* Writes the layout JSON (format.hpp layout_description()) into buf; returns the
 * length needed (excluding NUL). Truncates when buflen is too small. */
size_t spshm_header_layout(char* buf, size_t buflen);

/* Validates a 4096-byte header; data_object_size is the size of the object holding
 * the data (the same object for POSIX). */
int spshm_validate_header(const void* header, uint64_t data_object_size, char* err, size_t errlen);

/* Holder table: add / remove one hold of (pid, start_time) atomically. */
int spshm_hold(void* header, uint32_t pid, uint64_t start_time, int writable, char* err,
               size_t errlen);
int spshm_release(void* header, uint32_t pid, uint64_t start_time, char* err, size_t errlen);

/* A worker gives up its unadopted output (snakepit_shm.discard, keep_seconds, exit): one
 * compare-and-swap sets the deallocated state bit unless a VM set the adopted bit first,
 * so a give-up and an adoption (adopt_region/2's mark) never both win. Returns 1 if it was
 * given up (the caller then closes its descriptors and removes a POSIX name), 0 if a VM
 * adopted it (or it was deallocated) first: leave it alone; < 0 on an error. */
int spshm_give_up_output(void* header, char* err, size_t errlen);

/* Liveness (Linux open file description locks on the control object, docs/FORMAT.md
 * "Locks"). `fd` is this attachment's own open of the control object, kept open for as
 * long as the region is attached: closing it (or dying) drops every lock below. */
/* Takes the shared liveness lock (byte 0): sweepers then leave the segment alone. */
int spshm_liveness_lock(int fd, char* err, size_t errlen);
/* The worker's fast path (capi_attach.cpp): opens the memfds behind `control_path` and
 * `data_path` (/proc/<pid>/fd/<n> links) only if each link reads the expected name
 * before and after the open and each is a regular file of our uid; the control object
 * read-write, the data object read-write iff data_writable. Takes the liveness lock,
 * copies the 4096-byte header into header_out; the data link expected is the header's
 * data_name when set (a data memfd reused from the creator's warm pool), else data_link;
 * takes the data lock (spshm_lock_data: SPSHM_E_DEALLOCATED when the object went back to
 * the pool) and validates the header (message in err). On any
 * failure every descriptor is closed again and a code is returned (a refused open has no
 * message: the caller redoes the open its own way to explain it). */
int spshm_attach_memfd(const char* control_path, const char* control_link, const char* data_path,
                       const char* data_link, int data_writable, void* header_out, int* control_fd,
                       uint64_t* control_size, int* data_fd, uint64_t* data_size, char* err,
                       size_t errlen);
/* Takes the shared lock of byte 0 of a data memfd (docs/FORMAT.md, "The data memfd"),
 * held as long as this open or a mapping of it lives: its creator's warm pool never takes
 * back an object a worker still maps. Retries for a few milliseconds while the pool holds
 * it, then SPSHM_E_DEALLOCATED (the region that named it is gone). The one implementation
 * of this lock: the core's, as the NIF and the pool take it. */
int spshm_lock_data(int fd, char* err, size_t errlen);
/* hold/release through the slot owned by the open `fd` (*slot: -1 before the first hold;
 * updated). A slot whose owner died at any instant is recovered by the next claimer. */
int spshm_hold_fd(void* header, int fd, int* slot, uint32_t pid, uint64_t start_time, int writable,
                  char* err, size_t errlen);
int spshm_release_fd(void* header, int fd, int* slot, char* err, size_t errlen);
/* Arena regions: the same three with every lock byte shifted by `base`, the control
   block's offset in the arena object (docs/FORMAT.md, "Arenas"). */
int spshm_liveness_lock_at(int fd, uint64_t base, char* err, size_t errlen);
int spshm_hold_fd_at(void* header, int fd, uint64_t base, int* slot, uint32_t pid,
                     uint64_t start_time, int writable, char* err, size_t errlen);
int spshm_release_fd_at(void* header, int fd, uint64_t base, int* slot, char* err, size_t errlen);
/* spshm_release_fd_at before closing `fd`: the slot is freed but its lock is left to the
 * close(2) of `fd` that the caller MUST make next (the kernel drops every lock of the
 * open then), saving one lock system call; *slot keeps its index. */
int spshm_release_fd_closing(void* header, int fd, uint64_t base, int* slot, char* err,
                             size_t errlen);
/* Clears the header's `sealing` state bit (4) left by a sealer killed mid-seal: only if
 * nobody holds the seal lock (byte 2 + base of the control object, docs/FORMAT.md
 * "Locks"), taken exclusively through the read-write open `fd` and released at once.
 * 0 if the bit is clear on return; SPSHM_E_BUSY while a live sealer holds the lock (or
 * where it cannot be told). Never blocks. */
int spshm_clear_stale_sealing(void* header, int fd, uint64_t base, char* err, size_t errlen);
/* The fast attach of an arena region (capi_attach.cpp): opens `path` read-write only if
 * its link reads /memfd:spshm_arena_<20 of [a-z2-7]> (deleted) before and after the open
 * (the same text) and it is a regular file of our uid; takes the liveness lock at
 * `base`; copies the 4096-byte control block at `base` into header_out; checks it holds
 * `region_id` (else SPSHM_E_NOT_FOUND: a stale or forged offset) and validates it for a
 * data object of (size - base) bytes. On any failure the descriptor is closed again. */
int spshm_attach_arena(const char* path, uint64_t base, const char* region_id, void* header_out,
                       int* fd_out, uint64_t* size_out, char* err, size_t errlen);

/* Installs (once per process) the core's SIGBUS handler and points it at segment_dir (an
 * absolute path): a fault in a mapping of "<segment_dir>/spshm_*" (a POSIX segment a peer
 * truncated under this process) gets a private zero page instead of killing the process;
 * the caller finds the truncation by the file's size. Faults elsewhere go to the handler
 * installed before (the default action: the process dies, as without it). */
int spshm_install_fault_guard(const char* segment_dir, char* err, size_t errlen);

/* Start time (field 22 of /proc/<pid>/stat) of a process. */
int spshm_process_start_time(uint32_t pid, uint64_t* out, char* err, size_t errlen);

/* Decrypts plaintext bytes [offset, offset+length) of an encrypted region into out.
 * `data` is the start of the data area (header->data_offset already applied) and
 * `data_len` its mapped length; key is 32 bytes. SPSHM_E_TAMPERED on a failed tag. */
int spshm_decrypt(const void* header, const uint8_t* data, uint64_t data_len, const uint8_t* key,
                  uint64_t offset, uint8_t* out, uint64_t length, char* err, size_t errlen);

/* Encrypts `length` plaintext bytes into the region at `offset` (read-modify-write of
 * the chunks it touches, fresh nonces). For workers writing results into encrypted regions. */
int spshm_encrypt(const void* header, uint8_t* data, uint64_t data_len, const uint8_t* key,
                  uint64_t offset, const uint8_t* in, uint64_t length, char* err, size_t errlen);

/* Creates a region owned by the calling process, with the same core as the Elixir side
 * (random id, O_EXCL, fchmod 0600, posix_fallocate, header published, memfd seals).
 * backend: 1 POSIX (/dev/shm), 2 memfd. metadata_json may be NULL (an empty object);
 * idle_timeout_ns 0 never expires. Unencrypted (security level standard) only.
 * Writes the NUL-terminated id into region_id (>= 32 bytes). For memfd, *control_fd and
 * *data_fd receive new O_CLOEXEC descriptors of the two memfds, which keep the region
 * alive: the caller must keep them open until another process has opened the region
 * (/proc/<pid>/fd/<n> of these descriptors) and close them after; for POSIX the region is
 * reached by id, *data_fd is -1 and *control_fd a new O_CLOEXEC read-only descriptor of
 * the segment holding its shared liveness lock (taken before the core's own open closed:
 * no orphan sweep can ever find the new output unheld), which the caller keeps open as
 * long as the output must live. The core's own mapping is gone when this returns. */
int spshm_create(uint64_t size, int backend, const char* metadata_json, uint64_t idle_timeout_ns,
                 char* region_id, int* control_fd, int* data_fd, char* err, size_t errlen);

/* ---- status board (c_src/core/board.hpp, docs/FORMAT.md § status board) ---- */

/* Every slot of the board is taken (spshm_board_join). */
#define SPSHM_E_BOARD_FULL -100

/* Writes the board layout JSON (board_layout_description()) into buf; returns the
 * length needed (excluding NUL). */
size_t spshm_board_layout(char* buf, size_t buflen);

/* Validates the board at `data` (a region's data area, `bytes` long) and claims a free
 * slot for worker_id (1..64 bytes) of process (pid, start_time). On success *index is
 * the slot and *owner the word to pass to update/leave; *capacity (if non-NULL) the
 * board's slot count. SPSHM_E_BOARD_FULL when no slot is free.
 * Deprecated: a slot joined without its liveness lock looks dead to readers that ask
 * the kernel (least_loaded(verify: true), entries' alive) and may be taken over by a
 * joiner; workers use spshm_board_join_locked (below). */
int spshm_board_join(void* data, uint64_t bytes, const char* worker_id, size_t id_len, uint32_t pid,
                     uint64_t start_time, uint32_t* index, uint64_t* owner, uint32_t* capacity,
                     char* err, size_t errlen);

/* spshm_board_join, and the slot's liveness lock is taken through `fd`, this
 * process's own open of the board's segment (Linux OFD lock of byte 2^40 + index; see
 * docs/FORMAT.md): keep `fd` open while the slot is held, and close it after leaving.
 * The kernel drops the lock when the process dies, so others can tell a dead owner
 * from a live one; a slot whose owner died (even mid-join) is taken over. */
int spshm_board_join_locked(int fd, void* data, uint64_t bytes, const char* worker_id,
                            size_t id_len, uint32_t pid, uint64_t start_time, uint32_t* index,
                            uint64_t* owner, uint32_t* capacity, char* err, size_t errlen);

/* The writer's fast path: `slot` is data + 512 + 192 * index of a slot this process
 * joined; values[10] = state, queue, in_flight, memory, processed, errors, gauge 0..3
 * (gauges as two's-complement int64). A seqlock write: no lock, no system call.
 * Returns 0, or SPSHM_E_CLOSED if the slot is no longer ours (left or reclaimed). */
int spshm_board_update(void* slot, uint64_t owner, const uint64_t* values);

/* Frees a slot joined by this process. SPSHM_E_CLOSED if it was no longer ours. */
int spshm_board_leave(void* data, uint64_t bytes, uint32_t index, uint64_t owner, char* err,
                      size_t errlen);

#ifdef __cplusplus
}
#endif
#endif
