import { startBackend } from '../helpers/backend';
import { TestFrontend } from '../helpers/frontend';

test('smoke: write then read back through a real back-end', async () => {
  const be = startBackend();
  const fe = new TestFrontend(be.socket);
  try {
    await fe.setup();
    const data = Buffer.alloc(4096, 0x5a);
    const w = await fe.blk(0, 1, 8, { data });
    expect(w).toMatchObject({ status: 0, len: 1 });
    const r = await fe.blk(0, 0, 8, { readLen: 4096 });
    expect(r.status).toBe(0);
    expect(r.len).toBe(4097);
    expect(r.data!.equals(data)).toBe(true);
  } finally {
    fe.close();
    await be.close();
  }
});
