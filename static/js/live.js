// A websocket that stays connected, shared by the services list and the service page: it reconnects
// after 0.5 s, doubling up to 10 s, and says in a status element whether the page is live, offline
// (reconnecting) or done for good (e.g. the service was terminated). Loaded before the page's script
// (a file of its own: the Content-Security-Policy allows no inline scripts).
(function () {
  "use strict";

  // ws: or wss: to this site, like the page itself.
  function socketURL(path) {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    return scheme + "//" + location.host + path;
  }

  // options: path; state (element) with liveText, offlineText, finalText (a text, or a function of
  // the close event that returns one); onOpen(); onMessage(data); onClose(event), called first on
  // every close; isFinal(event): true when no reconnect is wanted.
  function keepLive(options) {
    let retry = 500;
    let stopped = false;
    const state = options.state;
    function show(text, warn) {
      if (!state) return;
      state.hidden = false;
      state.textContent = text;
      state.classList.toggle("warn", warn);
    }
    function connect() {
      if (!window.WebSocket || stopped) return;
      const socket = new WebSocket(socketURL(options.path));
      socket.onopen = () => {
        retry = 500;
        show(options.liveText, false);
        if (options.onOpen) options.onOpen();
      };
      socket.onmessage = (message) => options.onMessage(JSON.parse(message.data));
      socket.onclose = (event) => {
        if (options.onClose) options.onClose(event);
        if (options.isFinal && options.isFinal(event)) {
          stopped = true;
          const text = typeof options.finalText === "function" ? options.finalText(event) : options.finalText;
          show(text, true);
          return;
        }
        show(options.offlineText, true);
        setTimeout(connect, retry);
        retry = Math.min(retry * 2, 10000);
      };
    }
    connect();
  }

  window.modelserveLive = { socketURL: socketURL, keepLive: keepLive };
})();
