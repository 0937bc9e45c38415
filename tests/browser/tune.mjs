// Drives the Tune view in headless Chromium (playwright-core) for tests/tests/browser.rs:
// uploads a JSONL dataset, sets the run's settings, trains, downloads the prompts, then chats
// with them.
//
// Env: PAGE_URL (with ?view=tune&temperature=0&max_tokens=N), DATA_FILE (the JSONL to upload),
// SETTINGS (JSON: method, prefix, steps, lr, batch, seed), CHAT_PROMPT, DOWNLOAD (where the
// prompts file goes), SCREENSHOT_DIR, TIMEOUT_MS, CHROMIUM (default /usr/bin/chromium).
//
// Prints `STEP <n> <loss>` as training goes, and finally one line `RESULT <json>`.
import { launch } from "./launch.mjs";

const url = process.env.PAGE_URL;
const timeout = Number(process.env.TIMEOUT_MS || 600000);
const settings = JSON.parse(process.env.SETTINGS);
const shots = process.env.SCREENSHOT_DIR;

const browser = await launch();
const result = { console: [] };
let page;
const byId = (id) => page.locator(`[data-testid="${id}"]`);
const setNumber = async (id, value) => {
  await byId(id).fill(String(value));
  await byId(id).dispatchEvent("change");
};
try {
  page = await browser.newPage({ viewport: { width: 1200, height: 900 }, acceptDownloads: true });
  page.on("console", (m) => result.console.push(`${m.type()}: ${m.text()}`.slice(0, 500)));
  page.on("pageerror", (e) => result.console.push(`pageerror: ${e.message}`.slice(0, 500)));
  const started = Date.now();
  await page.goto(url);
  await byId("tune-view").waitFor({ timeout });
  await page.waitForFunction(() => !document.querySelector('[data-testid="tune-start"]').disabled, null, { timeout });
  result.ready_ms = Date.now() - started;

  await byId("tune-file").setInputFiles(process.env.DATA_FILE);
  await page.waitForFunction(() => document.querySelector('[data-testid="tune-data"]').value.length > 0, null, { timeout: 10000 });
  await byId("tune-method").selectOption(settings.method);
  await setNumber("tune-prefix", settings.prefix);
  await setNumber("tune-steps", settings.steps);
  await setNumber("tune-lr", settings.lr);
  await setNumber("tune-batch", settings.batch);
  await setNumber("tune-seed", settings.seed);

  const t0 = Date.now();
  await byId("tune-start").click();
  const progress = byId("tune-progress");
  let seen = 0;
  for (;;) {
    const phase = await progress.getAttribute("data-phase");
    const losses = ((await progress.getAttribute("data-losses")) || "").split(",").filter((x) => x);
    for (; seen < losses.length; seen++) console.log(`STEP ${seen + 1} ${losses[seen]}`);
    if (phase === "done" || phase === "error") break;
    if (Date.now() - started > timeout) throw new Error(`training did not finish within ${timeout} ms`);
    await page.waitForTimeout(100);
  }
  result.train_ms = Date.now() - t0;
  result.phase = await progress.getAttribute("data-phase");
  result.losses = ((await progress.getAttribute("data-losses")) || "").split(",").filter((x) => x).map(Number);
  result.tune_status = await byId("tune-status").textContent();
  result.plot_points = await page.locator('[data-testid="loss-plot"] polyline').getAttribute("points");
  if (shots) await page.screenshot({ path: `${shots}/tune.png`, fullPage: true });
  if (result.phase !== "done") throw new Error(`training failed: ${result.tune_status}`);

  const [download] = await Promise.all([page.waitForEvent("download", { timeout: 30000 }), byId("tune-download").click()]);
  result.download_name = download.suggestedFilename();
  await download.saveAs(process.env.DOWNLOAD);

  await byId("tune-chat").click();
  await byId("prompt-input").fill(process.env.CHAT_PROMPT);
  result.use_tuned = await byId("use-tuned").isChecked();
  await byId("send").click();
  const reply = page.locator('[data-testid="assistant-message"]').last();
  await reply.waitFor({ timeout });
  await page.waitForFunction(
    () => {
      const m = [...document.querySelectorAll('[data-testid="assistant-message"]')].pop();
      return m && m.getAttribute("data-done") === "true";
    },
    null,
    { timeout },
  );
  result.tokens = ((await reply.getAttribute("data-tokens")) || "").split(",").filter((t) => t).map(Number);
  result.error = (await reply.getAttribute("data-error")) === "true";
  result.text = await reply.locator(".text").textContent();
  result.device = await byId("compute-device").textContent();
  result.status = await byId("status").textContent();
  if (shots) await page.screenshot({ path: `${shots}/tune-chat.png`, fullPage: true });
} catch (e) {
  result.failure = String(e && e.stack ? e.stack : e);
  if (page) {
    result.status = await byId("status").textContent().catch(() => null);
    result.tune_status = await byId("tune-status").textContent().catch(() => null);
    if (shots) await page.screenshot({ path: `${shots}/tune-failure.png`, fullPage: true }).catch(() => {});
  }
} finally {
  await browser.close();
}
console.log(`RESULT ${JSON.stringify(result)}`);
process.exit(0);
