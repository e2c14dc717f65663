/** NVMe command building, completion decoding, registers and Identify parsing (drivers/nvme/). */
import {
  AdminOpcode,
  NvmOpcode,
  NvmeStatusError,
  createIoCq,
  createIoSq,
  grantedQueues,
  readCqe,
  readWrite,
  setNumberOfQueues,
  statusCode,
  writeSqe,
} from '../../drivers/nvme/command';
import { parseIdentifyController, parseIdentifyNamespace, parseNamespaceList } from '../../drivers/nvme/identify';
import {
  cqHeadDoorbell,
  decodeCap,
  decodeCsts,
  decodeVersion,
  encodeAqa,
  encodeCc,
  sqTailDoorbell,
} from '../../drivers/nvme/registers';

describe('SQE building', () => {
  test('Read with a 64-bit LBA and PRPs above 4 GiB lands in the right dwords', () => {
    const mem = new DataView(new ArrayBuffer(128));
    const slba = 0x1_2345_6789;
    writeSqe(mem, 64, 0xa003, readWrite(NvmOpcode.Read, 2, slba, 16, 0x1_0000_1000, 0x2_0000_0000, true));
    expect(mem.getUint8(64)).toBe(0x02); // opcode
    expect(mem.getUint8(65)).toBe(0); // FUSE/PSDT: PRPs
    expect(mem.getUint16(66, true)).toBe(0xa003); // CID
    expect(mem.getUint32(68, true)).toBe(2); // NSID
    expect(mem.getBigUint64(64 + 24, true)).toBe(0x1_0000_1000n); // PRP1
    expect(mem.getBigUint64(64 + 32, true)).toBe(0x2_0000_0000n); // PRP2
    expect(mem.getUint32(64 + 40, true)).toBe(0x2345_6789); // CDW10 SLBA low
    expect(mem.getUint32(64 + 44, true)).toBe(1); // CDW11 SLBA high
    expect(mem.getUint32(64 + 48, true)).toBe(15 | (1 << 30)); // NLB 0-based + FUA
    expect(new Uint8Array(mem.buffer, 0, 64).every((b) => b === 0)).toBe(true); // other slot untouched
  });

  test('bad fields are refused before anything is written', () => {
    const mem = new DataView(new ArrayBuffer(64));
    expect(() => writeSqe(mem, 0, 1, { opcode: 1, prp1: 0x1002 })).toThrow(/dword-aligned/);
    expect(() => writeSqe(mem, 0, 0x10000, { opcode: 1 })).toThrow(RangeError);
    expect(() => writeSqe(mem, 8, 1, { opcode: 1 })).toThrow(/outside the queue/);
    expect(() => readWrite(NvmOpcode.Write, 1, 0, 0, 0x1000)).toThrow(/block count/);
    expect(() => readWrite(NvmOpcode.Write, 1, 0, 65537, 0x1000)).toThrow(/block count/);
    expect(new Uint8Array(mem.buffer).every((b) => b === 0)).toBe(true);
  });

  test('admin commands: queue creation and Number of Queues', () => {
    const cq = createIoCq(3, 256, 0x40000, 3);
    expect(cq.opcode).toBe(AdminOpcode.CreateIoCq);
    expect(cq.cdw10).toBe((255 << 16) | 3);
    expect(cq.cdw11).toBe((3 << 16) | 0b11); // vector 3, IEN, PC
    expect(createIoCq(3, 256, 0x40000, null).cdw11).toBe(0b01); // polled: IEN = 0
    const sq = createIoSq(3, 256, 0x80000, 3);
    expect(sq.opcode).toBe(AdminOpcode.CreateIoSq);
    expect(sq.cdw11).toBe((3 << 16) | 1);
    expect(setNumberOfQueues(4, 2).cdw11).toBe((1 << 16) | 3);
    expect(grantedQueues(0x003f_0007)).toEqual({ sq: 8, cq: 64 });
    expect(() => createIoCq(0, 16, 0x1000, null)).toThrow(RangeError);
  });
});

describe('CQE decoding', () => {
  test('fields, status without the phase bit, and the error class', () => {
    const mem = new DataView(new ArrayBuffer(16));
    mem.setUint32(0, 0xdeadbeef, true);
    mem.setUint32(8, (7 << 16) | 12, true); // SQID 7, SQHD 12
    mem.setUint32(12, 0x1234 | (1 << 16) | (0x4281 << 17), true); // phase 1, DNR, SCT 2, SC 0x81
    const c = readCqe(mem, 0);
    expect(c).toEqual({ dw0: 0xdeadbeef, dw1: 0, sqHead: 12, sqId: 7, cid: 0x1234, status: 0x4281 });
    expect(statusCode(c.status)).toEqual({ sc: 0x81, sct: 2, crd: 0, more: false, dnr: true });
    const err = new NvmeStatusError('Read', c.status);
    expect(err.message).toMatch(/status code type 2, status code 0x81 \(do not retry\)/);
  });
});

describe('registers', () => {
  test('CAP as QEMU 7.2 reports it', () => {
    // MQES 0x7ff, CQR, TO 15 (7.5 s), DSTRD 0, CSS NVM + admin-only, MPSMIN 4 KiB, MPSMAX 64 KiB, CMBS.
    const cap = 0x7ffn | (1n << 16n) | (15n << 24n) | (0xc1n << 37n) | (4n << 52n) | (1n << 57n);
    const c = decodeCap(cap);
    expect(c.maxQueueEntries).toBe(2048);
    expect(c.contiguousQueues).toBe(true);
    expect(c.readyTimeoutMs).toBe(7500);
    expect(c.doorbellStride).toBe(4);
    expect(c.css & 1).toBe(1);
    expect(c.pageSizeMin).toBe(4096);
    expect(c.pageSizeMax).toBe(65536);
    expect(c.cmbs).toBe(true);
    expect(decodeCap(cap | (2n << 32n)).doorbellStride).toBe(16);
  });

  test('CC, AQA, CSTS, VS and doorbell offsets', () => {
    expect(encodeCc({ css: 0, pageSize: 4096, ams: 0, sqEntrySize: 64, cqEntrySize: 16 })).toBe((6 << 16) | (4 << 20));
    expect(encodeCc({ css: 0, pageSize: 8192, ams: 0, sqEntrySize: 64, cqEntrySize: 16 }) & (0xf << 7)).toBe(1 << 7);
    expect(() => encodeCc({ css: 0, pageSize: 3000, ams: 0, sqEntrySize: 64, cqEntrySize: 16 })).toThrow(RangeError);
    expect(encodeAqa(32, 64)).toBe((63 << 16) | 31);
    expect(() => encodeAqa(1, 2)).toThrow(RangeError);
    expect(decodeCsts(0b1001)).toMatchObject({ ready: true, fatal: false, shutdownStatus: 2, allOnes: false });
    expect(decodeCsts(0xffffffff)).toMatchObject({ allOnes: true, fatal: true });
    expect(decodeVersion(0x10400)).toBe('1.4.0');
    expect(sqTailDoorbell(0, 4)).toBe(0x1000);
    expect(cqHeadDoorbell(0, 4)).toBe(0x1004);
    expect(sqTailDoorbell(3, 4)).toBe(0x1018);
    expect(cqHeadDoorbell(3, 16)).toBe(0x1000 + 7 * 16);
  });
});

describe('Identify parsing', () => {
  test('controller fields', () => {
    const b = new Uint8Array(4096);
    const v = new DataView(b.buffer);
    v.setUint16(0, 0x1b36, true);
    b.set(Buffer.from('rnull-nvme-a        ', 'latin1'), 4);
    b.set(Buffer.from('QEMU NVMe Ctrl'.padEnd(40), 'latin1'), 24);
    b[77] = 7; // MDTS
    v.setUint16(256, 0x100, true); // OACS: DBBC
    b[258] = 3; // ACL
    b[512] = 0x66;
    b[513] = 0x44;
    v.setUint32(516, 256, true);
    v.setUint16(520, 0x15d, true);
    b[525] = 1;
    v.setUint32(536, 1, true);
    const c = parseIdentifyController(b);
    expect(c).toMatchObject({
      vid: 0x1b36,
      serial: 'rnull-nvme-a',
      model: 'QEMU NVMe Ctrl',
      mdts: 7,
      oacs: 0x100,
      abortLimit: 4,
      sqEntryMin: 64,
      cqEntryMax: 16,
      nn: 256,
      oncs: 0x15d,
      volatileWriteCache: true,
      sgls: 1,
    });
    expect(() => parseIdentifyController(new Uint8Array(100))).toThrow(RangeError);
  });

  test('namespace: size, the LBA format in use, metadata', () => {
    const b = new Uint8Array(4096);
    const v = new DataView(b.buffer);
    v.setBigUint64(0, 12288n, true);
    b[25] = 1; // two formats
    b[26] = 1 | 0x10; // format 1, extended LBA
    v.setUint32(128, 9 << 16, true); // format 0: 512, no metadata
    v.setUint32(132, (12 << 16) | 8, true); // format 1: 4096 + 8 bytes metadata
    b[29] = 1; // protection type 1
    b[33] = 1;
    const ns = parseIdentifyNamespace(b);
    expect(ns.nsze).toBe(12288);
    expect(ns.formatIndex).toBe(1);
    expect(ns.blockSize).toBe(4096);
    expect(ns.format.metadataSize).toBe(8);
    expect(ns.extendedLba).toBe(true);
    expect(ns.protectionType).toBe(1);
    expect(ns.dlfeat).toBe(1);
    expect(parseIdentifyNamespace(new Uint8Array(4096)).blockSize).toBe(0); // inactive NSID
  });

  test('active namespace list stops at the first zero', () => {
    const b = new Uint8Array(4096);
    const v = new DataView(b.buffer);
    v.setUint32(0, 1, true);
    v.setUint32(4, 2, true);
    v.setUint32(12, 9, true);
    expect(parseNamespaceList(b)).toEqual([1, 2]);
  });
});
