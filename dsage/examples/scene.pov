// A small scene for dsage.examples.povray: three spheres and a box on a checkered floor.
#version 3.7;
global_settings { assumed_gamma 1.0 }
camera { location <0, 2, -6> look_at <0, 0.8, 0> angle 50 }
light_source { <-5, 8, -6> color rgb 1 }
light_source { <6, 4, -3> color rgb <0.4, 0.4, 0.5> }
sky_sphere { pigment { gradient y color_map { [0 color rgb <0.9, 0.9, 1>] [1 color rgb <0.2, 0.35, 0.8>] } } }
plane { y, 0 pigment { checker color rgb 0.9 color rgb 0.25 scale 1 } finish { reflection 0.15 } }
sphere { <0, 1, 0>, 1 texture { pigment { color rgb <0.8, 0.15, 0.1> } finish { phong 0.8 reflection 0.25 } } }
sphere { <-1.9, 0.6, 0.8>, 0.6 texture { pigment { color rgb <0.1, 0.5, 0.9> } finish { specular 0.6 reflection 0.4 } } }
sphere { <1.8, 0.5, -0.4>, 0.5 texture { pigment { color rgbf <0.9, 1, 0.9, 0.85> } finish { reflection 0.1 } } interior { ior 1.5 } }
box { <-0.4, 0, -0.4>, <0.4, 0.8, 0.4> rotate y*35 translate <1.2, 0, 1.6> pigment { color rgb <0.95, 0.8, 0.2> } finish { phong 0.5 } }
