#!/usr/bin/env node
/**
 * Micro-benchmark of rnull's dispatch path alone: native pop() (chain walk + translation),
 * TypeScript parsing and dispatch to the null driver, and native push() (used ring publish),
 * with the avail ring refilled in-process — no socket, no eventfds, no second process.
 * It gives the per-request floor of the data path; `npm run bench` measures the real thing.
 *
 *   node bench/micro/dispatch.js [--requests N] [--batch N] [--memory-backed] [--write] [--bs BYTES] [--inflight]
 *
 * --inflight tracks the queue in an inflight region (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), as a
 * front-end that negotiated it gets: the per-request cost of the bookkeeping.
 */
'use strict';
const path = require('path');
const dist = path.join(__dirname, '..', '..', 'dist');
const { native } = require(path.join(dist, 'native'));
const { TagSet } = require(path.join(dist, 'block', 'tag-set'));
const { Disk } = require(path.join(dist, 'block', 'disk'));
const { NullDriver } = require(path.join(dist, 'drivers', 'null', 'null-driver'));
const { VirtioBlkQueue } = require(path.join(dist, 'virtqueue', 'blk-queue'));
const pino = require('pino');

const args = process.argv.slice(2);
const opt = (name, def) => {
  const i = args.indexOf(name);
  return i < 0 ? def : Number(args[i + 1]);
};
const REQUESTS = opt('--requests', 5_000_000);
const BATCH = opt('--batch', 32);
const BS = opt('--bs', 4096);
const MEMORY_BACKED = args.includes('--memory-backed');
const INFLIGHT = args.includes('--inflight');
const WRITE = args.includes('--write');
const SIZE = 256;

// Guest RAM: one 64 MiB memfd, gpa 0, front-end address elsewhere.
const RAM = 64 << 20;
const UADDR = 0x7f0000000000;
const fd = native.memfdCreate('micro', RAM);
const mem = new native.GuestMemory([{ gpa: 0, size: RAM, uaddr: UADDR, mmapOffset: 0, fd }]);
const view = Buffer.from(mem.chunks()[0]);
const memoryMap = { table: mem, views: [view], regions: [], release() {}, size: RAM };

const DESC = 0x1000, AVAIL = DESC + 16 * SIZE, USED = AVAIL + 4096, DATA = 1 << 20;
/** Writes descriptor i of the table. */
function put(i, addr, len, flags, next) {
  const o = DESC + 16 * i;
  view.writeBigUInt64LE(BigInt(addr), o);
  view.writeUInt32LE(len, o + 8);
  view.writeUInt16LE(flags, o + 12);
  view.writeUInt16LE(next, o + 14);
}
// One 3-descriptor chain per slot of SIZE/3 heads: header, data (device-writable), status.
const HEADS = Math.floor(SIZE / 3);
for (let h = 0; h < HEADS; h++) {
  const hdr = DATA + h * (BS + 64);
  const data = hdr + 32;
  const st = data + BS;
  view.writeUInt32LE(WRITE ? 1 : 0, hdr); // VIRTIO_BLK_T_OUT or _IN
  view.writeBigUInt64LE(BigInt((h * 8) % 100000), hdr + 8);
  put(3 * h, hdr, 16, 1, 3 * h + 1);
  put(3 * h + 1, data, BS, WRITE ? 1 : 3, 3 * h + 2); // device-readable for writes
  put(3 * h + 2, st, 1, 2, 0);
}

const log = pino({ level: 'silent' });
const tagSet = new TagSet({ nrHwQueues: 1, queueDepth: SIZE });
const driver = new NullDriver({ memoryBacked: MEMORY_BACKED });
const disk = new Disk({ name: 'micro', capacitySectors: 2048 * 1024, logicalBlockSize: 512, readOnly: false, serial: 'm', flush: true, tagSet, ops: driver });
const q = new VirtioBlkQueue(0, disk.hwQueues[0], disk, log);
const kick = native.eventfd();
let inflight = null;
let inflightFd = -1;
if (INFLIGHT) {
  const { InflightRegion, createInflightFd } = require(path.join(dist, 'virtqueue', 'inflight-region'));
  const c = createInflightFd(1, SIZE, 1);
  inflightFd = c.fd;
  inflight = new InflightRegion(c.fd, c.description, 1);
}
q.start({ memory: memoryMap, size: SIZE, descAddr: UADDR + DESC, availAddr: UADDR + AVAIL, usedAddr: UADDR + USED, lastAvailIdx: 0, eventIdx: true, indirect: true, kickFd: kick, callFd: -1, pollUs: 0, inflight }, true);

let availIdx = 0;
let next = 0;
function offer(n) {
  for (let i = 0; i < n; i++) {
    view.writeUInt16LE(3 * next, AVAIL + 4 + 2 * (availIdx % SIZE));
    availIdx = (availIdx + 1) & 0xffff;
    next = (next + 1) % HEADS;
  }
  view.writeUInt16LE(availIdx, AVAIL + 2);
}

function run(n) {
  let done = 0;
  while (done < n) {
    offer(Math.min(BATCH, HEADS));
    q.drain();
    done += Math.min(BATCH, HEADS);
  }
  return done;
}

run(200_000); // warm up the JIT
const cpu0 = process.cpuUsage();
const t0 = process.hrtime.bigint();
const done = run(REQUESTS);
const ns = Number(process.hrtime.bigint() - t0);
const cpu = process.cpuUsage(cpu0);
const st = q.state();
if (INFLIGHT && !st.inflightTracked) throw new Error('the ring is not tracked in the inflight region');
if (st.inflight !== 0 || q.stats.failedRequests !== 0 || q.stats.badChains !== 0) throw new Error(`unexpected state ${JSON.stringify(st)} ${JSON.stringify(q.stats)}`);
const res = {
  requests: done,
  batch: BATCH,
  bs: BS,
  memoryBacked: MEMORY_BACKED,
  write: WRITE,
  inflight: INFLIGHT,
  nsPerRequest: +(ns / done).toFixed(1),
  cpuNsPerRequest: +(((cpu.user + cpu.system) * 1000) / done).toFixed(1),
  mrps: +((done / ns) * 1000).toFixed(3),
};
console.log(JSON.stringify(res));
void q.stop().then(() => {
  native.close(kick);
  if (inflight !== null) {
    inflight.release();
    native.close(inflightFd);
  }
  mem.unmap();
  native.close(fd);
});
