# The appendix A.1.4 figure from attention_bench's tables in docs/:
#   gnuplot bench/attention_plot.gp   (writes docs/attention_glove_a14.png)
# Left: every method tuned to 0.1 +- 0.05 of ||O|| (attention_glove_a14.csv
# and attention_glove_large.csv); right: tuned to the paper's 0.1 +- 0.05 of
# ||V|| (attention_glove_a14_paper.csv). Speed-up = exact time / method time.
set terminal pngcairo size 1200,480 font ",10"
set output "docs/attention_glove_a14.png"
set datafile separator ","
set datafile commentschars "#"
set key autotitle columnhead
set multiplot layout 1,2
set logscale y
set xlabel "n (keys = queries, GloVe, d = 100)"
set ylabel "exact time / method time"
set grid
set key top left
set title "error held at 0.1 +- 0.05 of ||D^{-1}AV|| (relative)"
rel = "< cat docs/attention_glove_a14.csv; grep -v '^[#n]' docs/attention_glove_large.csv | sed -n '3,$p'"
plot rel using 1:8 with linespoints title "kmv (certified)", \
     rel using 1:14 with linespoints title "kmv (empirical)", \
     rel using 1:20 with linespoints title "uniform", \
     rel using 1:26 with linespoints title "KDEformer-style", \
     rel using 1:32 with linespoints title "BIMW21", \
     1 with lines dashtype 2 lc rgb "gray" notitle
set title "error held at 0.1 +- 0.05 of ||v|| (the paper's measure)"
pap = "docs/attention_glove_a14_paper.csv"
plot pap using 1:8 with linespoints title "kmv (certified)", \
     pap using 1:14 with linespoints title "kmv (empirical)", \
     pap using 1:20 with linespoints title "uniform", \
     pap using 1:26 with linespoints title "KDEformer-style", \
     pap using 1:32 with linespoints title "BIMW21", \
     1 with lines dashtype 2 lc rgb "gray" notitle
unset multiplot
