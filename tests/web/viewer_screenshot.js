// Opens the OHIF viewer in Debian's headless chromium (driven by playwright-core, no browser of its
// own), waits until the first viewport has drawn a non-blank image, then saves a screenshot.
//   node viewer_screenshot.js URL SCREENSHOT.png
// Prints one JSON line: {"drawn": bool, "text": "<the page's visible text>"}.
const path = require("path");
const { chromium } = require(path.join(__dirname, "node", "node_modules", "playwright-core"));

const FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync"];

function drawn() {
  // cornerstone draws each viewport into a 2D canvas; drawn = some pixel is neither black nor transparent
  for (const canvas of document.querySelectorAll("canvas")) {
    if (canvas.width < 64 || canvas.height < 64) continue;
    const context = canvas.getContext("2d", { willReadFrequently: true });
    if (!context) continue;
    const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
    let lit = 0;
    for (let i = 0; i < data.length; i += 16) if (data[i] + data[i + 1] + data[i + 2] > 30) lit++;
    if (lit > 500) return true;
  }
  return false;
}

(async () => {
  const [url, out, userDataDir] = process.argv.slice(2);
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: "/usr/bin/chromium", headless: true, args: FLAGS, viewport: { width: 1400, height: 900 },
  });
  const page = context.pages()[0] || await context.newPage();
  let ok = false;
  try {
    await page.goto(url, { waitUntil: "load", timeout: 60000 });
    await page.waitForFunction(drawn, null, { timeout: 120000, polling: 500 });
    // A fresh profile gets OHIF's tour and notice: dismissed; the patient panel in the header opened.
    for (const label of ["Skip all", "Confirm and hide", "Patient"]) {
      const button = page.getByText(label, { exact: true }).first();
      if (await button.isVisible().catch(() => false)) await button.click().catch(() => {});
      await page.waitForTimeout(500);
    }
    await page.waitForTimeout(1000); // overlays are drawn just after the image
    ok = true;
  } catch (error) {
    console.error(String(error));
  }
  await page.screenshot({ path: out });
  const text = await page.evaluate(() => document.body.innerText);
  console.log(JSON.stringify({ drawn: ok, text }));
  await context.close();
})();
