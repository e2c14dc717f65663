/**
 * jest: unit tests under test/unit, guest (QEMU) tests under test/e2e, and the nested-QEMU NVMe
 * test (test/nested/*.nested.ts, ~8 minutes: `npm test` runs it, `npm run test:e2e` does not).
 */
module.exports = {
  testEnvironment: 'node',
  roots: ['<rootDir>/test'],
  testMatch: ['**/*.test.ts', '**/*.nested.ts'],
  transform: { '^.+\\.ts$': ['ts-jest', { tsconfig: '<rootDir>/tsconfig.test.json' }] },
  testTimeout: 30000,
  reporters: ['default', '<rootDir>/test/reporters/summary.js'],
};
