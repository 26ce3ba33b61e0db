// Swagger UI from the copy BentoML ships (served by this service: no CDN), on /v1/openapi.json.
"use strict";
window.addEventListener("DOMContentLoaded", () => {
  window.ui = window.SwaggerUIBundle({
    url: "/v1/openapi.json",
    dom_id: "#swagger-ui",
    validatorUrl: null, // the default posts the document to validator.swagger.io
    deepLinking: true,
  });
});
