// The login page: a link from another site arrives without the SameSite=Strict
// session cookie, so the server showed this form; a same-origin fetch carries the
// cookie, and a live session goes straight back to the console.
"use strict";
fetch("/ui/session", { credentials: "same-origin" })
  .then((res) => { if (res.ok) location.replace("/ui/"); })
  .catch(() => {});
