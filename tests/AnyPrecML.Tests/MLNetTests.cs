using AnyPrecML.Evaluation;
using AnyPrecML.Generation;
using AnyPrecML.MLNet;
using AnyPrecML.Onnx;
using AnyPrecML.Quantization;
using AnyPrecML.Tokenization;
using Microsoft.ML;
using Microsoft.ML.Data;

namespace AnyPrecML.Tests;

[TestClass]
public sealed class MLNetTests
{
    private static TestData.TempDir _dir = null!;
    private static AnyPrecisionTransformer _model = null!;
    private static IDataView _data = null!;
    private static string[] _texts = null!;

    [ClassInitialize]
    public static void FitOnce(TestContext _)
    {
        _dir = TestData.NewTempDir();
        // Calibration and scoring rows: stories cut into sentences, as a TextLoader reads them.
        _texts = File.ReadLines(TestData.TinyStories).Take(12).SelectMany(l => l.Split(". ")).Where(s => s.Length > 0).Take(24).ToArray();
        File.WriteAllLines(_dir["rows.tsv"], _texts);
        var ml = new MLContext();
        _data = ml.Data.LoadFromTextFile(_dir["rows.tsv"], [new TextLoader.Column("Story", DataKind.String, 0)], separatorChar: '\t', allowQuoting: false);
        File.Copy(TestData.Stories260K, _dir["stories260K.bin"]);
        File.Copy(TestData.Tok512, _dir["tok512.model"]);
        var estimator = ml.Transforms.AnyPrecisionQuantize(new AnyPrecisionQuantizeOptions
        {
            ModelPath = _dir["stories260K.bin"], InputColumnName = "Story", Sensitivity = "hessian", CalibrationSamples = 8, Bits = 4,
        });
        _model = estimator.Fit(_data);
    }

    [ClassCleanup]
    public static void Cleanup()
    {
        _model.Dispose();
        _dir.Dispose();
    }

    private static (float[] LogLikelihood, int[] Tokens, float[] Perplexity, string[] Completion) Read(IDataView view)
    {
        var ll = view.GetColumn<float>("LogLikelihood").ToArray();
        var n = view.GetColumn<int>("TokenCount").ToArray();
        var ppl = view.GetColumn<float>("Perplexity").ToArray();
        var completion = view.GetColumn<string>("Completion").ToArray();
        return (ll, n, ppl, completion);
    }

    /// <summary>Σ log p of each text through the ONNX engine at <paramref name="bits"/>, called directly.</summary>
    private static double[] Direct(int bits)
    {
        using var engine = new OnnxEngine(_model.Model, new OnnxEngineOptions { Bits = bits });
        var tok = LlamaTokenizerLoader.Load(_model.Model.Checkpoint);
        return _texts.Select(t =>
        {
            var r = PerplexityEvaluator.Evaluate(engine, PerplexityEvaluator.Tokenize(tok, t, false));
            return -r.Nll * r.Tokens;
        }).ToArray();
    }

    [TestMethod]
    public void FitQuantizesOnceAndTheTransformerServesEveryWidth()
    {
        Assert.AreEqual(_dir["stories260K.anyprec"], _model.ModelDirectory);
        Assert.IsTrue(File.Exists(Path.Combine(_model.ModelDirectory, "model.safetensors")));
        CollectionAssert.AreEqual(new[] { 3, 4, 5, 6, 7, 8 }, _model.SupportedBits.ToArray());
        Assert.AreEqual(8, _model.ParentBits);
        Assert.AreEqual(4, _model.Bits);
        Assert.AreEqual("hessian", _model.Model.SensitivityKind);
    }

    [TestMethod]
    public void TransformEqualsTheDirectEngineAndFollowsBits()
    {
        var original = _model.Bits;
        try
        {
            foreach (int bits in new[] { 3, 8 })
            {
                _model.Bits = bits;
                var (ll, n, ppl, _) = Read(_model.Transform(_data));
                var expected = Direct(bits);
                Assert.HasCount(_texts.Length, ll);
                for (int i = 0; i < _texts.Length; i++)
                {
                    Assert.AreEqual(expected[i], ll[i], 1e-3 * Math.Abs(expected[i]), $"b={bits} row {i}");
                    Assert.AreEqual(Math.Exp(-ll[i] / n[i]), ppl[i], 1e-3 * ppl[i]);
                }
            }
            _model.Bits = 3;
            var at3 = Read(_model.Transform(_data)).LogLikelihood;
            _model.Bits = 8;
            var at8 = Read(_model.Transform(_data)).LogLikelihood;
            CollectionAssert.AreNotEqual(at3, at8, "changing Bits changes the outputs");
        }
        finally { _model.Bits = original; }
    }

    [TestMethod]
    public void SavedPipelineLoadsInAFreshContextAndGivesIdenticalOutputs()
    {
        var ml = new MLContext();
        var expected = Read(_model.Transform(_data)).LogLikelihood;
        string zip = _dir["pipeline.zip"];
        ml.Model.Save(_model, _data.Schema, zip);

        var fresh = new MLContext();
        var loaded = fresh.Model.Load(zip, out var schema);
        Assert.IsNotNull(schema.GetColumnOrNull("Story"));
        var actual = Read(loaded.Transform(_data)).LogLikelihood;
        CollectionAssert.AreEqual(expected, actual);
    }

    [TestMethod]
    public void TwoZipsAtDifferentWidthsFromOneModelDirectoryEachLoadTheirOwnWidth()
    {
        var ml = new MLContext();
        int original = _model.Bits;
        try
        {
            _model.Bits = 3;
            var at3 = Read(_model.Transform(_data)).LogLikelihood;
            ml.Model.Save(_model, _data.Schema, _dir["w3.zip"]);
            _model.Bits = 8;
            var at8 = Read(_model.Transform(_data)).LogLikelihood;
            ml.Model.Save(_model, _data.Schema, _dir["w8.zip"]);
            CollectionAssert.AreNotEqual(at3, at8);

            // Both loaded in one process, side by side, in either order.
            var loaded8 = new MLContext().Model.Load(_dir["w8.zip"], out _);
            var loaded3 = new MLContext().Model.Load(_dir["w3.zip"], out _);
            CollectionAssert.AreEqual(at3, Read(loaded3.Transform(_data)).LogLikelihood, "the first zip still loads 3 bits after the second was saved");
            CollectionAssert.AreEqual(at8, Read(loaded8.Transform(_data)).LogLikelihood);
            Assert.IsEmpty(Directory.GetFiles(_model.ModelDirectory, "mlnet*"), "saving writes nothing beside the model");
        }
        finally { _model.Bits = original; }
    }

    [TestMethod]
    public void ALoadedPipelineRefusesAChangedOrMissingModelByName()
    {
        var ml = new MLContext();
        string copy = _dir["copy.anyprec"];
        Directory.CreateDirectory(copy);
        foreach (var f in Directory.GetFiles(_model.ModelDirectory)) File.Copy(f, Path.Combine(copy, Path.GetFileName(f)));
        using (var model = ml.Transforms.AnyPrecisionQuantize(new AnyPrecisionQuantizeOptions { ModelPath = copy, InputColumnName = "Story" }).Fit(_data))
            ml.Model.Save(model, _data.Schema, _dir["copy.zip"]);

        // Another model written over the same directory (a different quantization: its tables change).
        using (var source = Models.LlamaCheckpoint.Open(_dir["stories260K.bin"]))
            AnyPrecisionQuantizer.Quantize(source, copy, new UniformSensitivity(), new QuantizerOptions { SeedBits = 3, ParentBits = 8, RandomSeed = 7 }, overwrite: true);
        var loaded = new MLContext().Model.Load(_dir["copy.zip"], out _);
        var e = Assert.Throws<Exception>(() => Read(loaded.Transform(_data)));
        var cause = e;
        while (cause is not InvalidDataException && cause.InnerException is { } inner) cause = inner;
        Assert.IsInstanceOfType<InvalidDataException>(cause, e.ToString());
        StringAssert.Contains(cause.Message, "is not the one this pipeline was saved with");

        Directory.Delete(copy, recursive: true);
        e = Assert.Throws<Exception>(() => Read(new MLContext().Model.Load(_dir["copy.zip"], out _).Transform(_data)));
        StringAssert.Contains(e.ToString(), "copy.anyprec: the any-precision model directory this pipeline was saved with is missing");
        Assert.DoesNotContain("TargetInvocationException", e.ToString());
    }

    [TestMethod]
    public void FourParallelCursorsOverAThousandRowsGiveTheSingleCursorValues()
    {
        var ml = new MLContext();
        var rows = Enumerable.Range(0, 1000).Select(i => new TextRow { Story = _texts[i % _texts.Length][..Math.Min(40, _texts[i % _texts.Length].Length)] + (i % 7) }).ToArray();
        var view = _model.Transform(ml.Data.LoadFromEnumerable(rows));
        var single = view.GetColumn<float>("LogLikelihood").ToArray();
        var column = view.Schema["LogLikelihood"];
        var cursors = view.GetRowCursorSet([column], 4);
        Assert.IsGreaterThan(1, cursors.Length, "the view must split into several cursors");
        var values = new System.Collections.Concurrent.ConcurrentDictionary<long, float>();
        Parallel.ForEach(cursors, cursor =>
        {
            var get = cursor.GetGetter<float>(column);
            var id = cursor.GetIdGetter();
            float v = 0;
            DataViewRowId rowId = default;
            while (cursor.MoveNext())
            {
                get(ref v);
                id(ref rowId);
                values[(long)rowId.Low] = v;
            }
            cursor.Dispose();
        });
        Assert.AreEqual(1000, values.Count);
        for (int i = 0; i < 1000; i++) Assert.AreEqual(single[i], values[i], $"row {i}");
    }

    [TestMethod]
    public void SixteenConcurrentCursorsGiveExactlyTheRowsOfOneCursorOnEveryColumn()
    {
        var ml = new MLContext();
        using var model = ml.Transforms.AnyPrecisionQuantize(new AnyPrecisionQuantizeOptions
        {
            ModelPath = _model.ModelDirectory, InputColumnName = "Story", Bits = 3, CompletionTokens = 3, Temperature = 0.8f, Seed = 5,
        }).Fit(_data);
        var rows = Enumerable.Range(0, 160).Select(i => new TextRow { Story = i % 11 == 0 ? "" : _texts[i % _texts.Length][..Math.Min(30, _texts[i % _texts.Length].Length)] + i }).ToArray();
        var view = model.Transform(ml.Data.LoadFromEnumerable(rows));
        var (ll, n, ppl, completion) = Read(view);
        string[] names = ["LogLikelihood", "TokenCount", "Perplexity", "Completion"];
        var columns = names.Select(c => view.Schema[c]).ToArray();
        var cursors = view.GetRowCursorSet(columns, 16);
        Assert.IsGreaterThan(1, cursors.Length, "the view must split into several cursors");
        var seen = new System.Collections.Concurrent.ConcurrentDictionary<long, (float, int, float, string)>();
        Parallel.ForEach(cursors, new ParallelOptions { MaxDegreeOfParallelism = 16 }, cursor =>
        {
            var gl = cursor.GetGetter<float>(columns[0]);
            var gn = cursor.GetGetter<int>(columns[1]);
            var gp = cursor.GetGetter<float>(columns[2]);
            var gc = cursor.GetGetter<ReadOnlyMemory<char>>(columns[3]);
            var id = cursor.GetIdGetter();
            float l = 0, p = 0; int k = 0; ReadOnlyMemory<char> c = default; DataViewRowId rowId = default;
            while (cursor.MoveNext())
            {
                gl(ref l); gn(ref k); gp(ref p); gc(ref c); id(ref rowId);
                Assert.IsTrue(seen.TryAdd((long)rowId.Low, (l, k, p, c.ToString())), $"row {rowId.Low} read twice");
            }
            cursor.Dispose();
        });
        Assert.HasCount(rows.Length, seen);
        for (int i = 0; i < rows.Length; i++)
            Assert.AreEqual((ll[i], n[i], ppl[i], completion[i]), seen[i], $"row {i}");
        Assert.IsTrue(completion.Any(c => c.Length > 0), "completions were generated");
    }

    public sealed class TextRow
    {
        public string Story { get; set; } = "";
    }

    [TestMethod]
    public void PredictionEngineScoresOneRowAndCompletionsEqualTheGenerator()
    {
        var ml = new MLContext();
        using var withCompletion = ml.Transforms.AnyPrecisionQuantize(new AnyPrecisionQuantizeOptions
        {
            ModelPath = _model.ModelDirectory, InputColumnName = "Story", Bits = 5, CompletionTokens = 12,
        }).Fit(_data);
        var engine = ml.Model.CreatePredictionEngine<TextRow, Prediction>(withCompletion);
        var p = engine.Predict(new TextRow { Story = "Once upon a time" });
        using var direct = new OnnxEngine(withCompletion.Model, new OnnxEngineOptions { Bits = 5 });
        var tok = LlamaTokenizerLoader.Load(withCompletion.Model.Checkpoint);
        string expected = new TextGenerator(direct, tok).Generate("Once upon a time", new GenerationOptions { MaxTokens = 12, Seed = 1 }).Text;
        Assert.AreEqual(expected, p.Completion);
        Assert.IsGreaterThan(0, p.TokenCount);
        Assert.IsLessThan(0f, p.LogLikelihood);
    }

    [TestMethod]
    public void SpeculativeCompletionsEqualTargetOnlyCompletions()
    {
        var ml = new MLContext();
        var rows = ml.Data.TakeRows(_data, 6);
        string[] Completions(int? draftBits, int bits)
        {
            using var t = ml.Transforms.AnyPrecisionQuantize(new AnyPrecisionQuantizeOptions
            {
                ModelPath = _model.ModelDirectory, InputColumnName = "Story", Bits = bits, CompletionTokens = 24, ScoreText = false,
                Engine = AnyPrecisionEngineKind.Reference, DraftBits = draftBits, DraftTokens = 4,
            }).Fit(rows);
            return t.Transform(rows).GetColumn<string>("Completion").ToArray();
        }
        var plain = Completions(null, 8);
        Assert.IsTrue(plain.All(c => c.Length > 0));
        CollectionAssert.AreEqual(plain, Completions(3, 8), "greedy completions drafted at 3 bits and verified at 8");
        CollectionAssert.AreEqual(Completions(null, 3), Completions(3, 3), "at Bits ≤ DraftBits rows decode target-only");
    }

    public sealed class Prediction
    {
        public float LogLikelihood { get; set; }
        public int TokenCount { get; set; }
        public float Perplexity { get; set; }
        public string Completion { get; set; } = "";
    }

    [TestMethod]
    public void EmptyLongAndOutOfRangeInputsHaveDefinedBehaviour()
    {
        var ml = new MLContext();
        string longText = string.Join(' ', File.ReadLines(TestData.TinyStories).Take(8)); // far beyond 512 tokens
        var rows = new[] { new TextRow { Story = "" }, new TextRow { Story = null! }, new TextRow { Story = longText } };
        var (ll, n, ppl, _) = Read(_model.Transform(ml.Data.LoadFromEnumerable(rows)));
        Assert.AreEqual(0, n[0]); Assert.AreEqual(0f, ll[0]); Assert.IsTrue(float.IsNaN(ppl[0]));
        Assert.AreEqual(0, n[1]); Assert.IsTrue(float.IsNaN(ppl[1]));
        Assert.IsGreaterThan(512, n[2], "a long text is scored in windows of the context, not cut");
        Assert.IsTrue(float.IsFinite(ppl[2]));

        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => _model.Bits = 2);
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => _model.Bits = 9);
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => ml.Transforms.AnyPrecisionQuantize(new AnyPrecisionQuantizeOptions { ModelPath = "x", Bits = 9 }));
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => ml.Transforms.AnyPrecisionQuantize(_model.ModelDirectory, "NoSuchColumn").Fit(_data));
    }
}
