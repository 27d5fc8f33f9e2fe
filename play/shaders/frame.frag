#version 330
// A generated frame scaled to its panel. The texture's own filter (nearest or linear) does the
// scaling; u_sharpen > 0 adds an unsharp mask in source-texel space (the "sharp" filter).
uniform sampler2D u_frame;
uniform vec2 u_texel;     // 1 / texture size
uniform float u_sharpen;  // unsharp-mask strength, 0 = off
in vec2 v_uv;
out vec4 f_color;

void main() {
    vec3 c = texture(u_frame, v_uv).rgb;
    if (u_sharpen > 0.0) {
        vec3 blur = 0.25 * (texture(u_frame, v_uv + vec2(u_texel.x, 0.0)).rgb
                          + texture(u_frame, v_uv - vec2(u_texel.x, 0.0)).rgb
                          + texture(u_frame, v_uv + vec2(0.0, u_texel.y)).rgb
                          + texture(u_frame, v_uv - vec2(0.0, u_texel.y)).rgb);
        c = clamp(c + u_sharpen * (c - blur), 0.0, 1.0);
    }
    f_color = vec4(c, 1.0);
}
