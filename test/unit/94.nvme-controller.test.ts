/**
 * Controller bring-up and shutdown (drivers/nvme/controller.ts) against a fake VFIO device that
 * emulates an NVMe controller's registers and admin queue in memory, including QEMU 7.2's quirk:
 * admin completions raise the MSI-X vector only if MSI-X was on when CC.EN was set.
 */
import { NvmeController } from '../../drivers/nvme/controller';
import { native } from '../../native';
import { FakeVfioDevice } from '../helpers/fake-vfio-device';

interface FakeOptions {
  /** CAP.TO in 500 ms units. */
  to?: number;
  /** CC.EN = 1 and CSTS.RDY = 1 at start (left enabled by someone else). */
  enabled?: boolean;
  /** RDY never becomes 1. */
  neverReady?: boolean;
  /** CSTS.CFS goes up when enabled. */
  fatalOnEnable?: boolean;
  /** Granted I/O SQs and CQs (0-based in dw0 as the spec says; here 1-based). */
  grant?: { sq: number; cq: number };
}

/** A fake NVMe controller behind a fake VFIO device. Events are recorded in order. */
class FakeNvme extends FakeVfioDevice {
  readonly events: string[] = [];
  closed = false;
  cc = 0;
  csts = 0;
  aqa = 0;
  asq = 0;
  acq = 0;
  pciCommand = 0;
  msix: number[] = [];
  msixAtEnable = false;
  private sqHead = 0;
  private cqTail = 0;
  private phase = 1;
  constructor(private readonly o: FakeOptions = {}) {
    super([{ start: 0, end: 0xfedfffff }, { start: 0xfef00000, end: 2 ** 39 - 1 }]);
    if (o.enabled === true) {
      this.cc = 1;
      this.csts = 1;
    }
  }

  read32(_bar: number, off: number): number {
    const cap = 0x7ffn | (1n << 16n) | (BigInt(this.o.to ?? 1) << 24n) | (1n << 37n) | (4n << 52n);
    switch (off) {
      case 0x00:
        return Number(cap & 0xffffffffn);
      case 0x04:
        return Number(cap >> 32n);
      case 0x08:
        return 0x10400;
      case 0x14:
        return this.cc;
      case 0x1c:
        return this.csts;
      default:
        return 0;
    }
  }
  write32(_bar: number, off: number, v: number): void {
    if (off === 0x14) {
      const was = this.cc & 1;
      this.cc = v;
      if ((v & 1) === 1 && was === 0) {
        this.events.push('CC.EN=1');
        this.msixAtEnable = this.msix.length > 0;
        this.sqHead = 0;
        this.cqTail = 0;
        this.phase = 1;
        if (this.o.fatalOnEnable === true) this.csts |= 2;
        else if (this.o.neverReady !== true) setTimeout(() => (this.csts |= 1), 5); // RDY a little later
      } else if ((v & 1) === 0 && was === 1) {
        this.events.push('CC.EN=0');
        setTimeout(() => (this.csts &= ~1), 5);
      }
      if (((v >>> 14) & 3) === 1) {
        this.events.push('CC.SHN=normal');
        setTimeout(() => (this.csts = (this.csts & ~0xc) | (2 << 2)), 5);
      }
    } else if (off === 0x24) {
      this.events.push('AQA');
      this.aqa = v;
    } else if (off === 0x28) this.asq = v;
    else if (off === 0x30) this.acq = v;
    else if (off === 0x1000) this.adminDoorbell(v);
  }
  configRead(off: number): number {
    return off === 4 ? this.pciCommand : 0;
  }
  configWrite(off: number, _w: number, v: number): void {
    if (off === 4) {
      this.pciCommand = v;
      this.events.push(`PCI command 0x${v.toString(16)}`);
    }
  }
  setMsix(fds: number[]): void {
    this.events.push(`setMsix(${fds.length})`);
    this.msix = fds;
  }
  close(): void {
    this.closed = true;
    this.events.push('close');
  }

  private adminDoorbell(tail: number): void {
    const entries = (this.aqa & 0xfff) + 1;
    while (this.sqHead !== tail) {
      const sqe = new DataView(this.mem(this.asq + this.sqHead * 64, 64).slice().buffer);
      this.sqHead = (this.sqHead + 1) % entries;
      const opcode = sqe.getUint8(0);
      const cid = sqe.getUint16(2, true);
      const prp1 = Number(sqe.getBigUint64(24, true));
      const cdw10 = sqe.getUint32(40, true);
      let dw0 = 0;
      this.events.push(`admin 0x${opcode.toString(16)}`);
      if (opcode === 0x06) {
        const out = this.mem(prp1, 4096);
        const v = new DataView(out.buffer, out.byteOffset, 4096);
        out.fill(0);
        if (cdw10 === 1) {
          out.set(Buffer.from('fake-serial'.padEnd(20)), 4);
          out.set(Buffer.from('Fake NVMe'.padEnd(40)), 24);
          out[77] = 5;
          v.setUint32(516, 2, true);
          out[525] = 1;
        } else if (cdw10 === 0) {
          v.setBigUint64(0, 1000n, true);
          v.setUint32(128, 12 << 16, true);
        }
      } else if (opcode === 0x09) {
        const g = this.o.grant ?? { sq: 8, cq: 4 };
        dw0 = ((g.cq - 1) << 16) | (g.sq - 1);
      }
      const cq = new DataView(this.mem(this.acq + this.cqTail * 16, 16).buffer, 0);
      const at = this.mem(this.acq + this.cqTail * 16, 16).byteOffset;
      cq.setUint32(at, dw0, true);
      cq.setUint32(at + 8, this.sqHead, true);
      cq.setUint32(at + 12, (cid | (this.phase << 16)) >>> 0, true);
      this.cqTail = (this.cqTail + 1) % entries;
      if (this.cqTail === 0) this.phase ^= 1;
      // QEMU 7.2: the admin vector only fires if MSI-X was on when the controller was enabled.
      if (this.msixAtEnable && this.msix.length > 0) native.eventfdWrite(this.msix[0]!);
    }
  }
}

const BDF = '0000:00:04.0';

describe('NvmeController bring-up against a fake device', () => {
  test('order: bus master, AQA, MSI-X, then CC.EN; admin completions arrive by interrupt', async () => {
    const dev = new FakeNvme();
    const c = await NvmeController.attach(dev, { bdf: BDF, ioQueues: 2 });
    try {
      const ev = dev.events;
      expect(ev.indexOf('PCI command 0x6')).toBe(0); // memory space + bus master
      expect(ev.indexOf('AQA')).toBeLessThan(ev.indexOf('setMsix(3)'));
      expect(ev.indexOf('setMsix(3)')).toBeLessThan(ev.indexOf('CC.EN=1'));
      expect(c.identity.serial).toBe('fake-serial');
      expect(c.identity.mdts).toBe(5);
      expect(c.maxTransferBytes).toBe(32 * 4096);
      expect(c.grantedIoQueues).toBe(4); // min(8 SQs, 4 CQs)
      expect(c.admin.interrupts).toBeGreaterThanOrEqual(2); // Identify + Set Features, by eventfd
      expect(c.vectors).toBe(3);
      const ns = await c.identifyNamespace(1);
      expect(ns.nsze).toBe(1000);
      expect(ns.blockSize).toBe(4096);
      // ASQ/ACQ point at memory the fake could reach, outside the MSI window.
      expect(dev.asq).toBeGreaterThanOrEqual(0x10000);
      expect(dev.asq >= 0xfee00000 && dev.asq <= 0xfeefffff).toBe(false);
    } finally {
      await c.shutdown();
    }
    expect(dev.events.slice(-2)).toEqual(['CC.SHN=normal', 'close']);
    expect(dev.closed).toBe(true);
  });

  test('reset: CC.EN=0 and RDY=0 awaited before the outstanding work is handed back; admin queue from empty, CC.EN=1, Number of Queues, I/O queues created again CQ first', async () => {
    const dev = new FakeNvme();
    const c = await NvmeController.attach(dev, { bdf: BDF, ioQueues: 2 });
    try {
      const q = await c.createIoQueuePair<number>(1, 16, 'poll');
      expect(q.qp.submitIo(2, 1, 0x10000, 0, 0, 0, 0, 0, 42)).toBeGreaterThanOrEqual(0); // the fake never completes it
      dev.events.length = 0;
      await c.reset(() => {
        dev.events.push(`whileDisabled RDY=${dev.csts & 1} inFlight=${q.qp.inFlight}`);
      });
      expect(dev.events).toEqual(['CC.EN=0', 'whileDisabled RDY=0 inFlight=0', 'CC.EN=1', 'admin 0x9', 'admin 0x5', 'admin 0x1']);
      expect(c.resets).toBe(1);
      // The queue works again from slot 0.
      expect(q.qp.nextTag).toBeGreaterThanOrEqual(0);
      expect(await c.identifyNamespace(1)).toMatchObject({ nsze: 1000 });
    } finally {
      await c.shutdown();
    }
  });

  test('a controller found enabled is disabled (RDY=0 awaited) before the admin queue is set', async () => {
    const dev = new FakeNvme({ enabled: true });
    const c = await NvmeController.attach(dev, { bdf: BDF });
    c.close();
    expect(c.foundEnabled).toBe(true);
    const ev = dev.events;
    expect(ev.indexOf('CC.EN=0')).toBeGreaterThanOrEqual(0);
    expect(ev.indexOf('CC.EN=0')).toBeLessThan(ev.indexOf('AQA'));
    expect(ev.indexOf('AQA')).toBeLessThan(ev.indexOf('CC.EN=1'));
  });

  test('RDY that never comes fails the bring-up after CAP.TO, and the device is released', async () => {
    const dev = new FakeNvme({ neverReady: true, to: 1 });
    const t = Date.now();
    await expect(NvmeController.attach(dev, { bdf: BDF })).rejects.toThrow(
      /enable: CSTS.RDY did not become 1 within CAP.TO \(500 ms\)/,
    );
    expect(Date.now() - t).toBeGreaterThanOrEqual(450);
    expect(Date.now() - t).toBeLessThan(5000);
    expect(dev.closed).toBe(true);
  });

  test('controller fatal status while enabling is reported at once', async () => {
    const dev = new FakeNvme({ fatalOnEnable: true, to: 20 });
    const t = Date.now();
    await expect(NvmeController.attach(dev, { bdf: BDF })).rejects.toThrow(/fatal status \(CSTS.CFS\)/);
    expect(Date.now() - t).toBeLessThan(5000); // not the 10 s of CAP.TO
    expect(dev.closed).toBe(true);
  });

  test('polling mode: no MSI-X, admin commands still complete', async () => {
    const dev = new FakeNvme();
    const c = await NvmeController.attach(dev, { bdf: BDF, interrupts: false });
    expect(dev.events.some((e) => e.startsWith('setMsix'))).toBe(false);
    expect(c.identity.serial).toBe('fake-serial');
    expect(c.admin.polledCompletions).toBeGreaterThanOrEqual(2);
    c.close();
  });

  test('MSI-X enabled only after CC.EN (the QEMU 7.2 trap): admin commands time out, bounded', async () => {
    // Emulates a driver with the wrong order: wire MSI-X after the fake was enabled.
    const dev = new FakeNvme();
    const setMsix = dev.setMsix.bind(dev);
    let enabled = false;
    dev.setMsix = (fds: number[]): void => {
      setMsix([]); // not now...
      const late = (): void => (enabled ? setMsix(fds) : void setTimeout(late, 1));
      late(); // ...but after CC.EN
    };
    const write32 = dev.write32.bind(dev);
    dev.write32 = (bar: number, off: number, v: number): void => {
      write32(bar, off, v);
      if (off === 0x14 && (v & 1) === 1) enabled = true;
    };
    await expect(NvmeController.attach(dev, { bdf: BDF, adminTimeoutMs: 300 })).rejects.toThrow(
      /Identify Controller \(queue 0, cid 0x[0-9a-f]+\) timed out after 300 ms/,
    );
    expect(dev.closed).toBe(true);
  });
});
