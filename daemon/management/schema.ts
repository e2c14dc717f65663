/**
 * The management protocol (protobufjs): each message is a length-delimited protobuf
 * (varint length prefix, then the message) on a unix stream socket; one Response per Request.
 */
import * as protobuf from 'protobufjs';

const MANAGEMENT_PROTO = `
syntax = "proto3";
package rnull.management;

message Request {
  oneof command {
    ListDisks list_disks = 1;
    BadBlocks bad_blocks = 2;
    GetStats get_stats = 3;
    DropCache drop_cache = 4;
    ResetController reset_controller = 5;
  }
}

// driver nvme: resets the disk's NVMe controller (outstanding requests are resubmitted).
message ResetController { string disk = 1; }

// Loses a disk's unflushed write-cache data, as a power failure would (cache_size).
message DropCache { string disk = 1; }

message ListDisks {}

// Bad sector ranges of a null disk (null_blk badblocks): 512-byte sectors, start and end inclusive.
message BadBlocks {
  enum Action { LIST = 0; ADD = 1; REMOVE = 2; }
  string disk = 1;
  Action action = 2;
  uint64 start = 3;
  uint64 end = 4;
}

message GetStats { string disk = 1; }

message Response {
  bool ok = 1;
  string error = 2;
  repeated DiskInfo disks = 3;
  repeated SectorRange bad_blocks = 4;
  repeated QueueStats queues = 5;
  uint64 cache_dirty_bytes = 6;
}

message DiskInfo {
  string name = 1;
  string socket = 2;
  uint64 capacity_sectors = 3;
  uint32 logical_block_size = 4;
  bool connected = 5;
  uint32 num_queues = 6;
  bool rotational = 7;
  uint32 hw_queue_depth = 8;
  bool shared_tags = 9;
}

message SectorRange { uint64 start = 1; uint64 end = 2; }

message QueueStats {
  uint32 index = 1;
  bool running = 2;
  uint64 requests = 3;
  uint64 failed_requests = 4;
  uint64 bad_chains = 5;
  uint32 in_flight = 6;
  bool broken = 7;
  uint64 batches = 8;
  uint64 calls = 9;
  uint64 spins = 10;
  uint64 spin_hits = 11;
  uint64 poll_ns = 12;
  uint32 thread = 13;  // 0: the main thread; n: worker thread n (disk option threads)
  NvmeQueueStats nvme = 14;  // driver nvme: the queue's I/O queue pair
  uint64 spin_yields = 15;  // polling spins ended early for another virtqueue of the same thread
}

message NvmeQueueStats {
  uint32 qid = 1;
  uint64 commands = 2;     // NVMe commands submitted
  uint64 splits = 3;       // extra commands from cutting requests (PRP junctions, MDTS)
  uint64 bounces = 4;      // commands sent through a bounce buffer
  uint64 aborts = 5;
  uint64 resets = 6;
  uint64 retries = 7;
  uint64 waits = 8;        // requests that waited for a command id or a bounce slot
  uint64 errors = 9;       // commands completed with an error status
  uint64 timeouts = 10;
  uint64 late = 11;        // completions for requests that had ended (dropped)
  uint64 stale = 12;       // completions dropped by command-id generation
  uint64 interrupts = 13;
  uint64 sq_doorbells = 14;
  uint64 cq_doorbells = 15;
  uint32 in_flight = 16;   // commands in flight
  uint64 sq_doorbells_skipped = 17;  // shadow doorbells: SQ tails the EventIdx let go without an MMIO write
  uint64 cq_doorbells_skipped = 18;  // likewise CQ heads
  bool shadow_doorbells = 19;        // the queue publishes doorbells through the shadow page (Doorbell Buffer Config accepted)
}
`;

const root = protobuf.parse(MANAGEMENT_PROTO, { keepCase: true }).root;
export const RequestType = root.lookupType('rnull.management.Request');
export const ResponseType = root.lookupType('rnull.management.Response');

export const BadBlocksAction = { LIST: 0, ADD: 1, REMOVE: 2 } as const;

export interface SectorRangeMsg {
  start: number;
  end: number;
}
export interface DiskInfoMsg {
  name: string;
  socket: string;
  capacity_sectors: number;
  logical_block_size: number;
  connected: boolean;
  num_queues: number;
  rotational: boolean;
  hw_queue_depth: number;
  shared_tags: boolean;
}
export interface QueueStatsMsg {
  index: number;
  running: boolean;
  requests: number;
  failed_requests: number;
  bad_chains: number;
  in_flight: number;
  broken: boolean;
  batches: number;
  calls: number;
  spins: number;
  spin_hits: number;
  spin_yields: number;
  poll_ns: number;
  thread: number;
  nvme?: NvmeQueueStatsMsg;
}
export interface NvmeQueueStatsMsg {
  qid: number;
  commands: number;
  splits: number;
  bounces: number;
  aborts: number;
  resets: number;
  retries: number;
  waits: number;
  errors: number;
  timeouts: number;
  late: number;
  stale: number;
  interrupts: number;
  sq_doorbells: number;
  cq_doorbells: number;
  in_flight: number;
  sq_doorbells_skipped?: number;
  cq_doorbells_skipped?: number;
  shadow_doorbells?: boolean;
}
export interface ResponseMsg {
  ok: boolean;
  error: string;
  disks: DiskInfoMsg[];
  bad_blocks: SectorRangeMsg[];
  queues: QueueStatsMsg[];
  cache_dirty_bytes: number;
}
export interface RequestMsg {
  list_disks?: Record<string, never>;
  bad_blocks?: { disk: string; action: number; start?: number; end?: number };
  get_stats?: { disk: string };
  reset_controller?: { disk: string };
  drop_cache?: { disk: string };
}

/** Decodes a Response into plain numbers (uint64 fields are small here). */
export function toResponse(msg: protobuf.Message): ResponseMsg {
  return ResponseType.toObject(msg, { longs: Number, defaults: true, arrays: true }) as ResponseMsg;
}

/**
 * Splits delimited messages off the front of `buf`; returns the messages and the unused rest.
 * @throws Error for a corrupt length prefix.
 */
export function readDelimited(buf: Buffer): { messages: Buffer[]; rest: Buffer } {
  const messages: Buffer[] = [];
  let off = 0;
  for (;;) {
    let len = 0;
    let shift = 0;
    let p = off;
    let complete = false;
    while (p < buf.length) {
      const b = buf[p++];
      len += (b & 0x7f) * 2 ** shift;
      shift += 7;
      if ((b & 0x80) === 0) {
        complete = true;
        break;
      }
      if (shift > 28) throw new Error('management message length prefix is corrupt');
    }
    // Refused as soon as the prefix is read, not after buffering the whole message.
    if (complete && len > 1 << 20) throw new Error(`management message of ${len} bytes exceeds 1 MiB`);
    if (!complete || p + len > buf.length) break;
    messages.push(buf.subarray(p, p + len));
    off = p + len;
  }
  return { messages, rest: buf.subarray(off) };
}
