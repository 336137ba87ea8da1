// Starts Swagger UI on /docs (a file, not an inline script: the Content-Security-Policy allows scripts from this
// origin only). validatorUrl null: no badge image from the public validator, which would be sent the schema's URL.
"use strict";

window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  layout: "BaseLayout",
  deepLinking: true,
  showExtensions: true,
  showCommonExtensions: true,
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
});
