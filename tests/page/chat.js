// Drives serve's chat page (/) in headless chromium: attach an image, ask, wait for the
// streamed answer and its stats line. Prints one JSON line: {answer, stats, model}.
// Usage: node chat.js http://127.0.0.1:PORT /path/to/image.png "question"
"use strict";
const puppeteer = require("puppeteer-core");

(async () => {
  const [url, image, question] = process.argv.slice(2);
  const browser = await puppeteer.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
  });
  try {
    const page = await browser.newPage();
    const errors = [];
    page.on("pageerror", (e) => errors.push(String(e)));
    await page.goto(url, { waitUntil: "load" });
    await page.waitForFunction(() => document.getElementById("model").textContent !== "…", { timeout: 60000 });
    const model = await page.$eval("#model", (e) => e.textContent);
    const input = await page.$("#image");
    await input.uploadFile(image);
    await page.waitForFunction(() => document.getElementById("pending").textContent.startsWith("attached"), { timeout: 60000 });
    await page.type("#prompt", question);
    await page.click("#send");
    await page.waitForSelector(".msg.assistant .stats, .msg.error", { timeout: 300000 });
    const answer = await page.$eval(".msg.assistant span, .msg.error span", (e) => e.textContent);
    const stats = await page.$eval(".msg.assistant .stats", (e) => e.textContent).catch(() => null);
    const shown = await page.$eval(".msg.user img", (e) => e.src.startsWith("data:image/")).catch(() => false);
    console.log(JSON.stringify({ model, answer, stats, image_shown: shown, errors }));
  } finally {
    await browser.close();
  }
})().catch((e) => { console.error("error: " + e.message); process.exit(1); });
