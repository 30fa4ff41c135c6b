// What the example scripts share: progress as JSON lines on stdout, and one way to end
// (exit 0 when `main` resolves; an "error" line and exit 1 when it fails or takes too long).
export const emit = (event, fields) => process.stdout.write(`${JSON.stringify({ event, ...fields })}\n`);

export function run(main, timeoutSeconds) {
  const watchdog = setTimeout(() => {
    emit('error', { error: `timed out after ${timeoutSeconds}s`, code: 'timeout' });
    process.exit(1);
  }, Number(timeoutSeconds) * 1000);
  main().then(
    () => {
      clearTimeout(watchdog);
      process.exit(0);
    },
    (error) => {
      emit('error', { error: String(error?.stack ?? error), code: error?.code ?? null });
      process.exit(1);
    },
  );
}
