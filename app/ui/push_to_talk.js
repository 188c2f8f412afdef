() => {
  // Push-to-talk for the voice panel (#voice, a gr.Audio with the microphone source).
  // Gradio records on a click of its Record button and stops on a click of Stop; this shim
  // clicks them while Space is held (outside text fields) or the "Hold to talk" button (#ptt)
  // is pressed. Releasing clicks Stop, and the page's stop_recording event sends the question.
  if (window.__pushToTalk) return;
  window.__pushToTalk = true;

  const voice = () => document.querySelector("#voice");
  const visibleButton = (selector) => {
    const button = voice()?.querySelector(selector);
    return button && button.offsetParent !== null && !button.disabled ? button : null;
  };
  let holding = false;    // the key or button is down
  let recording = false;  // we clicked Record for this hold

  function start() {
    if (holding || document.querySelector("#ptt")?.disabled) return;
    holding = true;
    document.body.classList.add("ptt-recording");
    // After an upload the panel shows its upload source: switch back to the microphone first,
    // and give the recorder a moment to appear.
    let tries = 40;
    const clickRecord = () => {
      if (!holding) return;  // released before the recorder was ready
      const record = visibleButton("button.record-button");
      if (record) {
        recording = true;
        record.click();
        return;
      }
      const microphone = voice()?.querySelector("button[aria-label='Record audio']");
      if (microphone && !microphone.classList.contains("selected")) microphone.click();
      if (--tries > 0) setTimeout(clickRecord, 50);
      else stop();  // no recorder: a recording or file is waiting to be sent, or no microphone
    };
    clickRecord();
  }

  function stop() {
    if (!holding) return;
    holding = false;
    document.body.classList.remove("ptt-recording");
    if (!recording) return;
    recording = false;
    // The recording starts asynchronously (microphone permission, device start-up): a quick
    // release may come before Stop exists, so wait for it a little.
    let tries = 40;
    const clickStop = () => {
      const button = visibleButton("button.stop-button");
      if (button) button.click();
      else if (--tries > 0) setTimeout(clickStop, 50);
    };
    clickStop();
  }

  const typing = (el) => el && (el.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(el.tagName));

  document.addEventListener("keydown", (event) => {
    if (event.code !== "Space" || typing(event.target)) return;
    event.preventDefault();  // no page scroll, no click on a focused button
    if (!event.repeat) start();
  });
  document.addEventListener("keyup", (event) => {
    if (event.code !== "Space" || typing(event.target)) return;
    event.preventDefault();
    stop();
  });
  document.addEventListener("pointerdown", (event) => {
    if (event.target.closest && event.target.closest("#ptt")) {
      event.preventDefault();
      start();
    }
  });
  document.addEventListener("pointerup", stop);
  document.addEventListener("pointercancel", stop);
  window.addEventListener("blur", stop);  // a key released in another window never reaches us
}
